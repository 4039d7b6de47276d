# Two commands: `make run` (the whole stack) and `make test` (the whole suite).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench install clean chromium monitoring-tools bench-dashboard

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is needed ($(PYTHON) not found); set PYTHON=..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m tests.devstack

# The browser tests drive Debian's chromium, never a downloaded build: installed here when missing (as root),
# else `make test` stops and says what to install.
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; \
	  else echo "The browser tests need Debian's chromium at /usr/bin/chromium: run 'sudo apt-get install -y chromium'"; exit 1; fi; }

# tests/test_monitoring.py runs promtool and prometheus (Debian's `prometheus` package) and docker-compose:
# installed when missing and run as root, else `make test` stops saying what to install. Never skipped.
monitoring-tools:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing="prometheus"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing$${missing:+ }$$missing (Debian) for the monitoring tests"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing \
			|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; }; \
		else \
			echo "The monitoring tests need Debian's packages: $$missing (sudo apt-get install $$missing)"; exit 1; \
		fi; \
	fi

# The gates first (seconds), then the suite: any of them failing fails `make test`.
test: $(STAMP) chromium monitoring-tools
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/ruff format --check proxy tests bench
	$(VENV)/bin/mypy proxy
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run.py

# The admin dashboard's queries on 1,000,000 records of 10,000 users (a scratch database on DATABASE_URL's server).
bench-dashboard: $(STAMP)
	$(PY) bench/dashboard_bench.py

clean:
	rm -rf $(VENV) .run
