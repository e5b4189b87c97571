# `make run` and `make test` install what LAP needs (idempotent, quick once done):
# a virtualenv in .venv with the project and its test tools, and the npm
# stand-ins (kinesalite, s3rver) in lap/local/node/node_modules, and OpenSearch (from Maven Central) in
# lap/local/opensearch/engine.

PYTHON ?= python3
VENV := .venv
NODE_DIR := lap/local/node
PY_STAMP := $(VENV)/.lap-installed
NODE_STAMP := $(NODE_DIR)/node_modules/.lap-installed
WEB_DIR := lap/web
WEB_STAMP := $(WEB_DIR)/vendor/.lap-installed
BROWSER_PACKAGES := chromium chromium-driver fonts-dejavu-core
# The local index: a real OpenSearch node, fetched from Maven Central by Maven (lap/local/opensearch/pom.xml).
OPENSEARCH_VERSION := 2.19.6
OPENSEARCH_DIR := lap/local/opensearch
OPENSEARCH_STAMP := $(OPENSEARCH_DIR)/engine/$(OPENSEARCH_VERSION)/.lap-installed
JAVA_PACKAGES := openjdk-17-jre-headless maven

.PHONY: install run test wheel constraints check-tools check-java browser screenshots clean openapi

install: check-tools $(PY_STAMP) $(NODE_STAMP) $(WEB_STAMP) $(OPENSEARCH_STAMP)

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

# OpenSearch 2.19 runs on Java 17 or newer; Maven fetches its distribution. As root, Debian's packages are
# installed when missing (as for chromium); otherwise make says what to install.
check-java:
	@java_ok() { command -v java >/dev/null 2>&1 && \
	  [ "$$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')" -ge 17 ] 2>/dev/null; }; \
	if ! java_ok || ! command -v mvn >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's $(JAVA_PACKAGES) for the local OpenSearch"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(JAVA_PACKAGES) >/dev/null || { \
	      apt-get update -q >/dev/null && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(JAVA_PACKAGES) >/dev/null; }; \
	  fi; \
	fi; \
	java_ok || { echo "LAP's local OpenSearch needs Java 17 or newer as 'java' on PATH."; \
	  echo "Install it (for example as root: apt-get install openjdk-17-jre-headless), then run make again."; exit 1; }; \
	command -v mvn >/dev/null 2>&1 || { echo "make fetches OpenSearch from Maven Central with Maven, and 'mvn' is not on PATH."; \
	  echo "Install it (for example as root: apt-get install maven), then run make again."; exit 1; }

# Maven downloads the distribution and the reindex module; install.py assembles the node in a side folder and
# renames it, so an interrupted install leaves nothing half-made.
$(OPENSEARCH_STAMP): $(OPENSEARCH_DIR)/pom.xml $(OPENSEARCH_DIR)/install.py | check-java
	rm -rf $(OPENSEARCH_DIR)/download
	mvn -q -B -Dstyle.color=never -f $(OPENSEARCH_DIR)/pom.xml dependency:copy-dependencies \
	  -DoutputDirectory=download
	$(PYTHON) $(OPENSEARCH_DIR)/install.py $(OPENSEARCH_DIR)/download $(OPENSEARCH_DIR)/engine/$(OPENSEARCH_VERSION) \
	  $(OPENSEARCH_VERSION)
	rm -rf $(OPENSEARCH_DIR)/download
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

# docs/openapi/*.json: the OpenAPI documents LAP serves, fetched from a LAP running on the default port
openapi:
	mkdir -p docs/openapi
	curl -sf http://127.0.0.1:8000/openapi.json | $(VENV)/bin/python -m json.tool --indent 1 > docs/openapi/ingest.json
	curl -sf http://127.0.0.1:8000/v1/openapi.json | $(VENV)/bin/python -m json.tool --indent 1 > docs/openapi/output.json

# docs/console/*.png, the pictures of docs/analysts.md: the browser tests, saving their screenshots there
screenshots: install browser
	LAP_CONSOLE_SCREENSHOTS=docs/console $(VENV)/bin/python -m pytest tests/test_console.py

# The exact build that cluster.yaml installs on the Ray cluster's nodes:
# dist/lap-<version of pyproject.toml>-py3-none-any.whl.
wheel: $(PY_STAMP) $(WEB_STAMP)
	rm -rf build dist/lap-*.whl
	$(VENV)/bin/python -m pip wheel --no-deps --quiet -w dist .
	rm -rf build

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules $(WEB_DIR)/node_modules $(WEB_DIR)/vendor $(OPENSEARCH_DIR)/engine
