.PHONY: demo test test-gguf bench
# The main job: fine-tune the embedded model offline and show what changed.
demo:
	scripts/setup.sh && .venv/bin/lorakit quickstart
# The whole test suite.
test:
	scripts/setup.sh --test && .venv/bin/lint-imports && .venv/bin/python -m pytest -q
# GGUF export checked by a real llama.cpp: compiles llama-cpp-python into .venv once (about 10 minutes on 2 cores),
# then runs the llama.cpp comparisons, which `make test` skips without it (here a skip is a failure).
test-gguf:
	scripts/setup.sh --test && scripts/setup_llamacpp.sh && \
	  LORAKIT_REQUIRE_LLAMACPP=1 .venv/bin/python -m pytest -q tests/test_gguf_llamacpp.py
# The headline training-speed benchmark (Trainer + peft vs TRL vs lorakit; see benchmarks/RESULTS.md).
bench:
	scripts/setup.sh --test && .venv/bin/python benchmarks/train_speed.py --threads 1 --out benchmarks/results/latest-speed.json
