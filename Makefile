# make serve   install what is missing, build the .mar, start the gateway (nginx) in front of
#              TorchServe, wait until a prediction answers; make serve REPLICAS=N for N replicas;
#              make serve MAR=model_store/NAME.mar serves another archive (make archive) as model NAME
# make archive MODEL=path.pt DATA=dir/ NAME=mynet [SPEC=spec.json]: your own classifier, doctored, calibrated,
#              OOD-fitted and golden-checked, into model_store/NAME.mar (report in build/NAME/; docs/your-model.md)
# make status  every replica, its workers, and whether a prediction can be served now
# make stop    stop the gateway and every replica started from this folder
# make demo    the browser demo on http://127.0.0.1:7860 (Gradio) in front of the running service
# make test    the whole suite (unit + integration against a real TorchServe)
# make image   the serving container image localhost/fashion-cnn-serve:latest, built with podman
SHELL   := /bin/bash
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEFAULT_MAR := model_store/fashion_cnn.mar
MAR     := $(DEFAULT_MAR)
HANDLER := $(wildcard handler/*.py) handler/model-config.yaml

.PHONY: install serve stop status demo test unit integration train mar rollout eval-real bench bench-cost bench-gateway bench-protocols bench-uploads bench-recording bench-shadow doctor archive lint clean

install: $(STAMP)
$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh

mar: $(DEFAULT_MAR)
# The int8 variant (scripts/train/export.py writes it) travels in the archive when it exists.
$(DEFAULT_MAR): $(STAMP) models/fashion_cnn.pt $(wildcard models/fashion_cnn.int8.pt) $(HANDLER)
	$(PY) -m scripts.deploy.package

# MAR=model_store/NAME.mar: serve that archive (make archive writes it) instead of the shipped model
serve: $(STAMP) $(if $(filter $(DEFAULT_MAR),$(MAR)),$(DEFAULT_MAR))
	$(PY) -m scripts.deploy.serve start $(if $(REPLICAS),--replicas $(REPLICAS)) \
		$(if $(filter-out $(DEFAULT_MAR),$(MAR)),--mar $(MAR))

stop: $(STAMP)
	$(PY) -m scripts.deploy.serve stop

status: $(STAMP)
	$(PY) -m scripts.deploy.serve status

# The browser demo on http://127.0.0.1:7860 in front of the running service (make serve first):
# DEMO_ARGS="--port 7861 --url http://127.0.0.1:8080 --key-file key_file.json"
demo: $(STAMP)
	$(PY) -m scripts.demo $(DEMO_ARGS)

# Installs podman + runc and builds a local Debian base (debootstrap) when missing: docs/container.md
.PHONY: image
image:
	bash deploy/container/build-image.sh

# pytest exits 5 when it collected no test: that fails `make test` too, with a message.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing on purpose" >&2; fi; exit $$rc

unit: $(STAMP)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

integration: $(STAMP)
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

# Reproduce models/fashion_cnn.pt (and models/fashion_cnn.int8.pt): DATA=<IDX folder | class-per-folder tree> (default: the shared subset)
# ADD=<tree from ctl export-labelled>: labelled answers added to the training split (the held-out split unchanged)
train: $(STAMP)
	$(PY) -m scripts.train.train $(if $(DATA),--data $(DATA)) $(foreach d,$(ADD),--add $(d)) $(TRAIN_ARGS)
	$(PY) -m scripts.train.export

# Roll out a new version beside the running one: make rollout VERSION=2.0 [MODEL=path.pt] [ROLLOUT_ARGS="--retire unregister"]
# ROLLOUT_ARGS="--stage": load it beside the default on every replica without switching (then ctl shadow/canary/promote)
rollout: $(STAMP)
	$(PY) -m scripts.deploy.rollout --version $(VERSION) $(if $(MODEL),--model-file $(MODEL)) $(ROLLOUT_ARGS)

# Real photos and non-garments through the running server (make serve first): docs/real_world.*
eval-real: $(STAMP)
	$(PY) -m scripts.evaluate.real_world --json docs/real_world.json --markdown docs/real_world_table.md \
		--grid docs/real_world_grid.png $(EVAL_ARGS)

# Benchmarks (results: docs/benchmarks.md). Installs `hey` from Debian if missing.
bench: $(STAMP) $(DEFAULT_MAR)
	$(PY) -m scripts.bench $(BENCH_ARGS)
	$(PY) -m scripts.bench.protocols
	$(PY) -m scripts.bench.uploads
	$(PY) -m scripts.bench.recording

# REST v2 binary and gRPC (the standard clients' protocols) vs /predictions at concurrency 16: its section of docs/benchmarks.md
bench-protocols: $(STAMP) $(DEFAULT_MAR)
	$(PY) -m scripts.bench.protocols $(PROTOCOLS_ARGS)

# Uploads (28x28 to 12 MP JPEG, HEIC, AVIF): in-process against each file's decode floor, and through the front door
bench-uploads: $(STAMP) $(DEFAULT_MAR)
	$(PY) -m scripts.bench.uploads $(UPLOADS_ARGS)

# Recording every answer (spool + recorder + SQLite) on vs off at concurrency 16: its section of docs/benchmarks.md
bench-recording: $(STAMP) $(DEFAULT_MAR)
	$(PY) -m scripts.bench.recording $(RECORDING_ARGS)

# A shadow rollout on vs off (every default prediction also answered by a candidate) at concurrency 1 and 16:
# the "Shadow rollout" section of docs/benchmarks.md
bench-shadow: $(STAMP)
	$(PY) -m scripts.bench.shadow $(SHADOW_ARGS)

# What canonicalisation + OOD detection cost against the handler and model before them: docs/benchmarks_cost.md
bench-cost: $(STAMP)
	$(PY) -m scripts.bench.cost $(BENCH_ARGS)

# Diagnose a TorchScript classifier before serving it: make doctor MODEL=path.pt [SPEC=spec.json] [DATA=dir]
# (default: the shipped model); one verdict per check, exit 1 if any fails, report + figures in build/doctor/
doctor: $(STAMP)
	$(PY) -m scripts.diagnose.doctor --model $(or $(MODEL),models/fashion_cnn.pt) $(if $(SPEC),--spec $(SPEC)) \
		$(if $(DATA),--data $(DATA)) $(DOCTOR_ARGS)

# Bring your own classifier (docs/your-model.md): the doctor, a proposed spec when SPEC is not given, calibration,
# an out-of-distribution detector, golden inputs, a report in build/NAME/ and model_store/NAME.mar;
# ARCHIVE_ARGS="--ood-data other/ --test-share 0.5 ..." (python -m scripts.byo.archive --help)
archive: $(STAMP)
	@if [ -z "$(MODEL)" ] || [ -z "$(DATA)" ] || [ -z "$(NAME)" ]; then \
		echo "usage: make archive MODEL=path.pt DATA=dir/ NAME=mynet [SPEC=spec.json] [ARCHIVE_ARGS=...]" >&2; exit 2; fi
	$(PY) -m scripts.byo.archive --model $(MODEL) --data $(DATA) --name $(NAME) $(if $(SPEC),--spec $(SPEC)) $(ARCHIVE_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check handler scripts tests

clean:
	rm -rf build model_store/*.mar logs

# The gateway's overhead and 1 vs 2 replicas at concurrency 16: the gateway section of docs/benchmarks.md
bench-gateway: $(STAMP) $(DEFAULT_MAR)
	$(PY) -m scripts.bench.gateway $(BENCH_ARGS)
