.PHONY: demo test bench
# The main job: fine-tune the embedded model offline and show what changed.
demo:
	scripts/setup.sh && .venv/bin/lorakit quickstart
# The whole test suite.
test:
	scripts/setup.sh --test && .venv/bin/lint-imports && .venv/bin/python -m pytest -q
# The headline training-speed benchmark (Trainer + peft vs TRL vs lorakit; see benchmarks/RESULTS.md).
bench:
	scripts/setup.sh --test && .venv/bin/python benchmarks/train_speed.py --threads 1 --out benchmarks/results/latest-speed.json
