# The skinfed runtime for Flower's deployment engine (flwr 1.42): one image for the
# SuperLink, the SuperNodes, the SuperExecs that run the ServerApp and the
# ClientApps, and each hospital's privacy firewall service (docker-compose.yml
# picks the program with `entrypoint`).
#
#   docker build -t skinfed:0.1.0 .
#   docker build -t skinfed:0.1.0 --build-arg SKINFED_UID="$(id -u)" --build-arg SKINFED_GID="$(id -g)" .
#   docker build -t skinfed:0.1.0 --build-arg BASE_IMAGE=skinfed-base:bookworm .   # no registry: see
#                                                            # scripts/deployment_check.sh base-image
#
# No `# syntax=` line and nothing BuildKit-only: Debian's docker.io (no buildx) and
# docker-compose 1.29 build it with the classic builder, and BuildKit would try to
# pull a frontend image from a registry.
#
# Inside: the project installed with pip (not editable), so the embedded flow
# model's weights ship as package data (site-packages/models/embedded). Not inside:
# SD3/FLUX weights (mounted read-only at /models at run time), certificates and
# keys (mounted), patient data (mounted read-only at /data).

# CUDA 12.4 runtime, cuDNN 9, Python 3.11 and torch 2.5.1 / torchvision 0.20.1,
# which satisfy the project's pins, so pip keeps them. The image also runs on
# hosts without a GPU (torch falls back to the CPU). Any base with Python 3.10+ as
# `python` on PATH, pip that reaches a package index, and groupadd/useradd works
# (pip then installs torch from the index).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# The project's dependencies as a requirements file, in a stage of its own: the
# final stage copies the file, whose content (not pyproject.toml's) decides
# whether the big dependency layer (torch) must be built again.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; d = tomllib.load(open('/tmp/pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt

FROM ${BASE_IMAGE}

# The uid/gid the containers run as: match the owner of the mounted keys and data.
ARG SKINFED_UID=1000
ARG SKINFED_GID=1000
# Every site of a federation runs the same flwr; docker-compose.yml's flags are
# those of this version (tests/test_deployment.py checks them against it).
ARG FLWR_VERSION=1.42.0

# Nothing is downloaded at run time: weights come from /models or the package.
# No Flower telemetry, no per-run `uv sync` (the image holds every dependency).
# SKINFED_HOME is paths.home: the firewall's work and cache, the server's run directories.
# A new named volume takes the owner of the folder it is mounted on: /work and
# /deidentified belong to the containers' user, so the volumes are writable.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    SKINFED_HOME=/work

RUN groupadd --gid "${SKINFED_GID}" skinfed \
    && useradd --uid "${SKINFED_UID}" --gid "${SKINFED_GID}" --create-home --shell /usr/sbin/nologin skinfed \
    && mkdir -p /work /var/lib/flwr /home/skinfed/.flwr /models /data /certs /deidentified \
    && chown skinfed:skinfed /work /var/lib/flwr /home/skinfed/.flwr /deidentified

WORKDIR /
# The dependencies first: this big layer is rebuilt only when they change, not on
# every change of the source.
COPY --from=requirements /tmp/requirements.txt /tmp/skinfed-deps/requirements.txt
RUN python -m pip install --no-cache-dir -r /tmp/skinfed-deps/requirements.txt "flwr[simulation]==${FLWR_VERSION}" \
    && rm -rf /tmp/skinfed-deps

# The build context is filtered by .dockerignore: no .venv, runs, data, certificates or keys.
# The product's packages only: the attacker's side (audit/) and the experiments
# stay out of a hospital's image (the firewall's CLI then has no evaluate/benchmark).
COPY pyproject.toml README.md /tmp/skinfed-src/
COPY common/ /tmp/skinfed-src/common/
COPY client/ /tmp/skinfed-src/client/
COPY server/ /tmp/skinfed-src/server/
COPY privacy_firewall/ /tmp/skinfed-src/privacy_firewall/
COPY models/ /tmp/skinfed-src/models/
COPY synthetic_clinic/ /tmp/skinfed-src/synthetic_clinic/
COPY skinfed/ /tmp/skinfed-src/skinfed/
COPY conf/ /tmp/skinfed-src/conf/

# conf/ (Hydra YAML) is not a package: it goes beside the installed packages,
# where privacy_firewall.settings looks for it (the Flower apps read the conf/ of
# the app bundle that `flwr run` sends, beside the bundle's packages).
RUN python -m pip install --no-cache-dir --no-deps /tmp/skinfed-src \
    && cp -r /tmp/skinfed-src/conf "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/conf" \
    && rm -rf /tmp/skinfed-src \
    && python -c "from models.embedded import find_embedded_weights; print('embedded model:', find_embedded_weights())" \
    && python -c "from privacy_firewall.settings import load_firewall_settings; load_firewall_settings([])" \
    && flower-superexec --version && privacy-firewall watch --help > /dev/null

USER ${SKINFED_UID}:${SKINFED_GID}
WORKDIR /work
# SuperLink (Fleet, Control and Runtime APIs) and SuperNode Runtime API.
EXPOSE 9093 9094

# The ServerApp/ClientApp runtime; docker-compose.yml sets the arguments, and
# `entrypoint: ["flower-superlink"]` / `["flower-supernode"]` / `["privacy-firewall"]`
# for the other roles.
ENTRYPOINT ["flower-superexec"]
CMD ["--help"]
