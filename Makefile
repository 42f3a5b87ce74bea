.PHONY: demo test
# The main job: fine-tune the embedded model offline and show what changed.
demo:
	scripts/setup.sh && .venv/bin/lorakit quickstart
# The whole test suite.
test:
	scripts/setup.sh --test && .venv/bin/python -m pytest -q
