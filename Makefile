# The two commands of the README:
#   make demo   set up and run the daemon on embedded defaults with the LIS simulator
#   make test   set up and run the whole test suite (CI runs exactly this)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_TOOLS := storescu dciodvfy Orthanc chromium chromedriver pdftoppm
APT_PACKAGES := dcmtk dicom3tools orthanc chromium chromium-driver poppler-utils \
	fonts-dejavu-core fonts-droid-fallback fonts-nanum
# Fonts the PDF embeds (lisplugin/reports/fonts.py): every script of a patient's name prints.
FONT_FILES := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
	/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf \
	/usr/share/fonts/truetype/nanum/NanumGothic.ttf

.PHONY: demo test setup system-deps lint soak fuzz

$(BIN)/lisplugin: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[train,test,fuzz]"
	touch $@

setup: $(BIN)/lisplugin

# Real peers for the tests: DCMTK, dicom3tools, Orthanc, Chromium, poppler, fonts (Debian packages).
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	for f in $(FONT_FILES); do [ -f $$f ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

demo: setup
	$(BIN)/lisplugin demo $(if $(IMAGE),--image $(IMAGE),)

lint: setup
	$(BIN)/ruff check lisplugin tests fuzz

test: setup system-deps lint
	$(BIN)/python -m pytest -q

# Hours-long checks, on demand (README "Reliability figures"). PostgreSQL: POSTGRES (libpq DSN).
POSTGRES ?= host=127.0.0.1 port=5432 dbname=postgres user=postgres
SOAK_CAPTURES ?= 2000
SOAK_ACCESSIONS ?= 200
soak: setup
	$(BIN)/lisplugin soak --captures $(SOAK_CAPTURES) --accessions $(SOAK_ACCESSIONS) \
	  --kill-every 20 --outage-at 60 --outage-seconds 20 --rate 10 --settle-timeout 900
	$(BIN)/lisplugin soak --captures $(SOAK_CAPTURES) --accessions $(SOAK_ACCESSIONS) \
	  --postgres "$(POSTGRES)" --kill-every 20 --outage-at 60 --outage-seconds 20 --rate 10 --settle-timeout 900
	$(BIN)/lisplugin soak --captures $(SOAK_CAPTURES) --accessions $(SOAK_ACCESSIONS) \
	  --postgres "$(POSTGRES)" --processes 3 --kill-every 20 --outage-at 60 --outage-seconds 20 --rate 10 --settle-timeout 900

# The fuzzers for longer than the test suite gives them (FUZZ_SECONDS per atheris harness).
FUZZ_SECONDS ?= 600
fuzz: setup
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_RUNS=100000000 FUZZ_EXAMPLES=200 \
	  $(BIN)/python -m pytest -q -m fuzz tests/test_fuzz.py
