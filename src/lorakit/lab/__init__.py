"""The embedded lab: the fact table, corpus, tokenizer and pre-training behind the embedded
model, its instruction dataset, and the `lorakit quickstart` demo (base vs tuned, side by side).
"""
