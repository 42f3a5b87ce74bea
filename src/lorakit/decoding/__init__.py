"""The decoding room: the one KV-cache decoding loop, below both the training room and the inference room.

`decode.decode` (a batch of token-id prompts, one forward per step with the KV cache, per-row sampling and
seeds) is what generation, evaluation and the server use (lorakit.infer), and what GRPO samples its
completions with during training (lorakit.train.grpo), so train never imports infer. `sampling.py` chooses the
next token; `kv_cache.py` and `lora_fastpath.py` are the decoder's speed-ups.
"""
