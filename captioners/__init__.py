"""VLM captioning back ends (vLLM on Ray actors, OpenAI-compatible servers, transformers): next issue."""
