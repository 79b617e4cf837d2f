# Two commands after cloning:
#   make quickstart   a virtual environment with PyTorch (the CPU build unless an NVIDIA GPU is present),
#                     lorasurgeon and the test references; then the quick start on the committed fixtures
#   make test         the test suite (pytest; "no tests collected" is a failure, not a pass)
# Inside an active virtual environment (VIRTUAL_ENV set) that one is used instead of .venv.

VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: quickstart test setup

setup: $(VENV)/.lorasurgeon-installed

$(VENV)/.lorasurgeon-installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

quickstart: setup
	$(BIN)/lorasurgeon merge fixtures/base fixtures/adapter -o merged --overwrite

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$status
