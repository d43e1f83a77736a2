# Two commands for a newcomer: `make demo` (main job on the embedded tiny policy) and `make test`.
# Both create .venv idempotently: the stamp file is rebuilt only when the dependency list changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean-venv

$(STAMP): pyproject.toml scripts/install_libero.sh scripts/install_report_deps.sh
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	bash scripts/install_libero.sh $(VENV)
	# headless Chromium renders report/index.html in the report test
	bash scripts/install_report_deps.sh
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/python scripts/quickstart.py

test: setup
	# two worker processes, one test module each at a time (module fixtures stay in one process)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV) .venv-client
