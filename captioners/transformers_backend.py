"""Back end `transformers`: Hugging Face `generate`, batched, for CPU runs and small jobs.

Requests are rendered with the model's own chat template from the shared message builder (image
placeholders in the turn, the PIL images passed beside it), left-padded into one batch and decoded
greedily (or sampled when captioner.temperature > 0).
"""

from __future__ import annotations

from captioners.messages import chat_messages
from captioners.requests import CaptionRequest, CaptionResult
from schemas.config import CaptionerSection


def _placeholder(_img) -> dict:
    return {"type": "image"}


class TransformersBackend:
    name = "transformers"

    def __init__(self, cfg: CaptionerSection):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg, self.torch = cfg, torch
        self.model_id = cfg.model_ref
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("captioner.device is cuda but this worker sees no CUDA GPU")
        self.device = torch.device(cfg.device)
        kw = {"revision": cfg.revision} if cfg.revision else {}
        self.processor = AutoProcessor.from_pretrained(cfg.model, **kw)
        self.processor.tokenizer.padding_side = "left"
        dtype = torch.bfloat16 if cfg.device == "cuda" else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype, **kw).to(self.device).eval()
        self.pad_id = self.processor.tokenizer.pad_token_id

    def caption(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        torch = self.torch
        texts = [self.processor.apply_chat_template(chat_messages(r, _placeholder), tokenize=False, add_generation_prompt=True)
                 for r in requests]
        inputs = self.processor(text=texts, images=[r.images for r in requests], return_tensors="pt", padding=True).to(self.device)
        sampling = {"do_sample": False} if self.cfg.temperature == 0 else {
            "do_sample": True, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
        if self.cfg.temperature > 0:
            torch.manual_seed(self.cfg.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, pad_token_id=self.pad_id, **sampling)
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = out[:, prompt_len:]
        decoded = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, text, n_prompt in zip(new_tokens, decoded, prompt_tokens):
            results.append(CaptionResult(text=text, n_tokens=int((row != self.pad_id).sum()), prompt_tokens=int(n_prompt)))
        return results

    def close(self) -> None:
        del self.model
