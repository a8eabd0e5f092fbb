"""The HTTP service: FastAPI app, request schemas, the GPU job queue."""
