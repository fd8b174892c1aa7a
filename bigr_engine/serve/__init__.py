"""`bigr serve`: an HTTP generation service with dynamic batching (batcher), metrics and a page (app)."""
