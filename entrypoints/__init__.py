"""HTTP fronts beside tritonserver: the OpenAI API and vLLM's /generate route (api_server.py),
translated to the `llm` model's gRPC stream on the same server. Nothing here imports the engine."""
