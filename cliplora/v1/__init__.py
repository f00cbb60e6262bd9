"""Generated gRPC code for the cliplora.v1 API (from proto/cliplora/v1/*.proto; `make proto`)."""
