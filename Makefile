# make demo: a fresh virtual environment, then the FEBRL4 demo end to end.
# make test: the same environment plus test dependencies, then the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt requirements-ray.txt $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/python server_socket.py --once --quiet & \
	$(BIN)/python client_socket.py --wait 120; status=$$?; wait; exit $$status

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q
