# `make run` and `make test` install what LAP needs (idempotent, quick once done):
# a virtualenv in .venv with the project and its test tools, and the npm
# stand-ins (kinesalite, s3rver) in lap/local/node/node_modules.

PYTHON ?= python3
VENV := .venv
NODE_DIR := lap/local/node
PY_STAMP := $(VENV)/.lap-installed
NODE_STAMP := $(NODE_DIR)/node_modules/.lap-installed
WEB_DIR := lap/web
WEB_STAMP := $(WEB_DIR)/vendor/.lap-installed
BROWSER_PACKAGES := chromium chromium-driver fonts-dejavu-core

.PHONY: install run test wheel constraints check-tools browser screenshots clean

install: check-tools $(PY_STAMP) $(NODE_STAMP) $(WEB_STAMP)

check-tools:
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { \
	  echo "LAP's local stack needs Node.js 18 or newer with npm, and they are not on PATH."; \
	  echo "Install them (for example: apt-get install nodejs npm, or from nodejs.org), then run make again."; \
	  exit 1; }
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' || { \
	  echo "LAP's local stack needs Node.js 18 or newer; found $$(node --version)."; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || { \
	  echo "LAP needs Python 3.11 or newer; '$(PYTHON)' is not. Run: make PYTHON=python3.11 ..."; exit 1; }

# deploy/constraints.txt pins what the cluster's nodes install; the tests run with the same versions.
$(PY_STAMP): pyproject.toml deploy/constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c deploy/constraints.txt -e '.[test,local,aws]'
	touch $@

# After a change to a dependency: resolve afresh (no constraints), then pin what got installed.
constraints: check-tools
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[test,local,aws]'
	$(VENV)/bin/python deploy/freeze_constraints.py
	touch $(PY_STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error
	touch $@

# The browser assets LAP serves itself (lap/web): installed with npm, the served files copied to vendor/,
# which the wheel ships. SCARF_ANALYTICS=false: swagger-ui-dist's install script reports nothing.
$(WEB_STAMP): $(WEB_DIR)/package.json $(WEB_DIR)/package-lock.json
	SCARF_ANALYTICS=false npm ci --prefix $(WEB_DIR) --no-audit --no-fund --loglevel=error
	mkdir -p $(WEB_DIR)/vendor
	cp $(addprefix $(WEB_DIR)/node_modules/swagger-ui-dist/,swagger-ui-bundle.js swagger-ui.css favicon-32x32.png LICENSE) \
	  $(WEB_DIR)/vendor/
	touch $@

# The console's browser tests drive Debian's chromium through its chromedriver (tests/test_console.py).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's $(BROWSER_PACKAGES) for the console's browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null || { \
	      apt-get update -q >/dev/null && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null; }; \
	  else \
	    echo "The console's browser tests need Debian's chromium and chromedriver."; \
	    echo "Install them as root: apt-get install $(BROWSER_PACKAGES), then run make again."; exit 1; \
	  fi; }

run: install
	$(VENV)/bin/lap up $(if $(CONFIG),--config $(CONFIG))

test: install browser
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# docs/console/*.png, the README's pictures: the browser tests, saving their screenshots there
screenshots: install browser
	LAP_CONSOLE_SCREENSHOTS=docs/console $(VENV)/bin/python -m pytest tests/test_console.py

# The exact build that cluster.yaml installs on the Ray cluster's nodes:
# dist/lap-<version of pyproject.toml>-py3-none-any.whl.
wheel: $(PY_STAMP) $(WEB_STAMP)
	rm -rf build dist/lap-*.whl
	$(VENV)/bin/python -m pip wheel --no-deps --quiet -w dist .
	rm -rf build

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules $(WEB_DIR)/node_modules $(WEB_DIR)/vendor
