# The two commands of the README: `make train` (set up, then run the main job) and `make test`.
.PHONY: setup train test test-fast stress

setup:
	bash scripts/setup.sh

train: setup
	.venv/bin/arclight train examples/calc/config.yaml

# Two lanes, two pytest processes: the integration tests one after the other, the unit tests beside them
# (scripts/test_lanes.py). Not xdist: its loadgroup groups nothing on pytest 9.2 (pytest-xdist#1386), and two heavy
# tests at once ran the hosts test out of memory (docs/testing.md).
test: setup
	.venv/bin/python scripts/test_lanes.py

# Unit tests only (no vLLM, no servers beyond the collector).
test-fast:
	.venv/bin/python -m pytest -q -ra -n 2 -m "not integration"

# Reliability runs, not in CI (minutes): thousands of fuzz examples against a real collector, good
# clients next to a hostile one, then 100k spans sent while the collector and a second compactor
# are SIGKILLed at random (reports: JSON).
stress: setup
	ARCLIGHT_FUZZ_EXAMPLES=$${ARCLIGHT_FUZZ_EXAMPLES:-2000} .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=0 --hypothesis-show-statistics tests/test_collector_fuzz.py tests/test_converter_fuzz.py
	.venv/bin/python -m tests.stress_neighbours --seconds 60
	.venv/bin/python -m tests.stress_sigkill --spans $${STRESS_SPANS:-100000}
