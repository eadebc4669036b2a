"""OpenAI-compatible HTTP front-end and the engine-core process it drives over ZMQ."""
