# Everything a fresh machine needs, with only Python present.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[nlp,dev,plots]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests -q

demo:
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) *.egg-info
