# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := test,data,beam
# 8 simulated CPU devices so sharding is exercised without an accelerator.
CPU_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8
DATA := .cache/data

.PHONY: demo test venv data clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py $(wildcard requirements/*.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

data: $(VENV)/.installed
	$(PY) scripts/fetch_data.py

test: venv data
	$(CPU_ENV) $(PY) -m pytest -q -n 2 --durations=15 tests

demo: venv data
	$(CPU_ENV) $(PY) -m launch.demo --workdir=$(or $(WORKDIR),workdir/demo)

clean:
	rm -rf $(VENV) .cache .pytest_cache
