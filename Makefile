# txmta: make run | make test | make bench
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= etc/txmta.toml
export PYTHONPATH := $(CURDIR)

.PHONY: all venv run test test-unit test-integration torture debs benchdebs bench soak check-config clean

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/twistd -n txmta --config $(CONFIG)

check-config: venv
	$(VENV)/bin/txmta check-config $(CONFIG)

# Debian packages the tests use: smtp-source/smtp-sink (postfix), swaks, fail2ban
# (fail2ban-regex checks etc/fail2ban/filter.d/txmta.conf), chromium (the dashboard's
# headless browser test) and redis-server (the [cluster] tests start their own on a
# loopback port).
# The fail2ban, postfix and redis daemons are never started: policy-rc.d forbids service
# starts during install.
debs:
	@if ! command -v smtp-sink >/dev/null || ! command -v swaks >/dev/null || ! command -v openssl >/dev/null \
	        || ! command -v fail2ban-regex >/dev/null \
	        || ! [ -x /usr/bin/chromium ] || ! command -v redis-server >/dev/null \
	        || ! perl -MNet::SSLeay -MIO::Socket::SSL -e1 2>/dev/null; then \
	    if [ "$$(id -u)" != 0 ]; then echo "need root to install postfix, swaks (with Net::SSLeay, IO::Socket::SSL), openssl, fail2ban, redis-server, chromium" >&2; exit 1; fi; \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix swaks openssl libnet-ssleay-perl libio-socket-ssl-perl fail2ban chromium redis-server; \
	fi

test: venv debs
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: venv
	$(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/integration --ignore=tests/torture

# The benchmark (bench/README.md: Postfix, txmta-w1 and txmta-w2, pinned to one CPU and on
# all CPUs, 20 sessions x 5000 x 4 KB, with py-spy profiles), then the soak tests (pytest -m
# bench: e.g. 20000 messages relayed while the daemon is killed 10 times); SOAK=0 skips them.
# BENCH_ARGS replaces the arguments of bench/run.py (default: --profile).  Then bench/api.py:
# the HTTP API beside SMTP intake (wrk) and webhook events/s; API=0 skips it.  Then
# bench/lanes.py: transactional latency behind a bulk backlog; LANES=0 skips it.  Then
# bench/cluster.py: SMTP intake with [cluster] (a local redis-server) on and off; CLUSTER=0
# skips it.
SOAK ?= 1
API ?= 1
LANES ?= 1
CLUSTER ?= 1
BENCH_ARGS ?= --profile
bench: venv debs benchdebs $(VENV)/bin/py-spy
	$(PY) bench/run.py $(BENCH_ARGS)
	@if [ "$(API)" = 1 ]; then $(PY) bench/api.py; fi
	@if [ "$(LANES)" = 1 ]; then $(PY) bench/lanes.py; fi
	@if [ "$(CLUSTER)" = 1 ]; then $(PY) bench/cluster.py; fi
	@if [ "$(SOAK)" = 1 ]; then $(MAKE) --no-print-directory soak; fi

# what only the benchmark needs: wrk, the HTTP load of bench/api.py
benchdebs:
	@if ! command -v wrk >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk || \
	    { DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk; }; \
	fi

# the sampling profiler of `bench/run.py --profile`
$(VENV)/bin/py-spy: $(VENV)/.installed
	$(PY) -m pip install -q py-spy

# The torture suite's long versions (tests/torture, docs/durability.md): 100 kills, 10,000
# connections, ten minutes of fuzzing.  `make test` runs the short versions.
torture: venv debs
	TXMTA_TORTURE=long $(PY) -m pytest -q -p no:cacheprovider tests/torture

soak: venv debs
	$(PY) -m pytest -q -p no:cacheprovider -m bench tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
