# The two commands of the README: `make train` (set up, then run the main job) and `make test`.
.PHONY: setup train test test-fast

setup:
	bash scripts/setup.sh

train: setup
	.venv/bin/arclight train examples/calc/config.yaml

test: setup
	.venv/bin/python -m pytest -q -ra

# Unit tests only (no vLLM, no servers beyond the collector).
test-fast:
	.venv/bin/python -m pytest -q -ra -m "not integration"
