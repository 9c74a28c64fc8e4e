"""VLM captioning: back ends (vLLM in Ray actors, OpenAI-compatible servers, transformers), prompts,
requests and caption clean-up (docs/design.md, "Captions")."""
