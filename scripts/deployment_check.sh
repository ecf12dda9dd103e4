#!/usr/bin/env bash
# Build the skinfed image and run docker-compose.yml for real on this host.
#
#   sudo scripts/deployment_check.sh            # everything: base image, image, stack check
#   sudo scripts/deployment_check.sh base-image # only the local Debian base image (no registry needed)
#   sudo scripts/deployment_check.sh image      # base image + skinfed:0.1.0
#   sudo scripts/deployment_check.sh stack      # the end-to-end check with an existing skinfed:0.1.0
#   sudo scripts/deployment_check.sh down       # remove what a killed check left behind
#
# Needs: a running Docker engine, `docker-compose` (1.29, Debian's) or `docker compose`
# (v2), debootstrap (for the base image), and this checkout's .venv (flwr CLI,
# cryptography). Nothing is pulled from an image registry: the base image is made
# with debootstrap from the Debian mirror, and pip in the image build reaches the
# Python package index with the host's CA bundle.
#
# The stack check (tests/system/test_docker_stack.py drives the same steps and checks the
# results) starts the coordinator and two hospitals on this CPU host (the GPU block
# replaced as docs/deployment.md says), enrols the hospitals, runs two rounds with
# `flwr run`, kills hospital 2's containers during round 2, and checks that the run
# finishes with hospital 2 reported as failed, that an unregistered SuperNode key is
# refused and that the firewall containers have no network. Every container talks
# only over the bridges this compose project creates and 127.0.0.1 on this host.
#
# Environment (all optional):
#   SKINFED_BASE_IMAGE   base image to build on     (default skinfed-base:bookworm, made here)
#   DEBIAN_MIRROR        mirror for debootstrap     (default: the host's apt source, else deb.debian.org)
#   KEEP=1               leave the stack and the scratch folder in place after the check
#   WORK                 scratch folder             (default a new folder under /var/tmp)
#
# The last stdout line is one JSON object with the outcome.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_IMAGE="${SKINFED_BASE_IMAGE:-skinfed-base:bookworm}"
ROOTFS_IMAGE="skinfed-debian-rootfs:bookworm"
IMAGE="skinfed:0.1.0"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

say() { printf '[deployment-check] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
    # The first plain Debian archive URI of the host's apt sources (deb822 or one-line format).
    local uri
    uri="$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | head -n1 | tr -d ' ' || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}

# ------------------------------------------------------------------------------ base image
# Debian 12 (python3.11) from debootstrap, a venv on PATH, and the host's CA bundle so
# pip can reach the package index (also behind a TLS-inspecting proxy). Idempotent:
# an existing image is reused.
build_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE exists: reused"
        return
    fi
    [[ "$BASE_IMAGE" == "skinfed-base:bookworm" ]] || die "base image $BASE_IMAGE not found (and only skinfed-base:bookworm is made here)"
    if ! docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || die "debootstrap is not installed: apt-get install debootstrap"
        local rootfs mirror
        rootfs="$(mktemp -d /var/tmp/skinfed-rootfs.XXXXXX)"
        mirror="$(debian_mirror)"
        say "debootstrap bookworm from $mirror into $rootfs (a few minutes)"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" "$mirror" >&2
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        say "importing the root file system as $ROOTFS_IMAGE"
        tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$ROOTFS_IMAGE" >/dev/null
        rm -rf "$rootfs"
    fi
    local context
    context="$(mktemp -d /var/tmp/skinfed-base.XXXXXX)"
    cp /etc/ssl/certs/ca-certificates.crt "$context/ca-certificates.crt"
    cat > "$context/Dockerfile" <<EOF
FROM $ROOTFS_IMAGE
# The host's CA bundle: pip reaches the package index through whatever TLS the host trusts.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \\
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8
RUN python3 -m venv /opt/venv && /opt/venv/bin/python -m pip install --no-cache-dir --upgrade pip \\
    && python --version
EOF
    say "building $BASE_IMAGE (Python venv at /opt/venv)"
    DOCKER_BUILDKIT=0 docker build -q -t "$BASE_IMAGE" "$context" >&2
    rm -rf "$context"
}

# ------------------------------------------------------------------------------ the image
build_image() {
    build_base_image
    say "building $IMAGE on $BASE_IMAGE (pip installs the project and flwr; the first build downloads torch)"
    # The classic builder: Debian's docker.io has no buildx, and nothing here needs BuildKit.
    DOCKER_BUILDKIT=0 docker build --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" "$ROOT" >&2
}

# ------------------------------------------------------------------------------ the stack
run_stack_check() {
    docker image inspect "$IMAGE" >/dev/null 2>&1 || die "$IMAGE not built: run '$0 image' first"
    [[ -x "$PYTHON" ]] || die "$PYTHON not found: make the checkout's .venv first (make test)"
    # tests/system/test_docker_stack.py holds the steps and the checks; run here as a script.
    (cd "$ROOT" && "$PYTHON" -m tests.system.docker_stack --no-build)
}

main() {
    local what="${1:-all}"
    command -v docker >/dev/null || die "docker is not installed: apt-get install docker.io docker-compose"
    docker info >/dev/null 2>&1 || die "the Docker engine is not running (systemctl start docker, or dockerd &)"
    case "$what" in
        base-image) build_base_image ;;
        image) build_image ;;
        stack) run_stack_check ;;
        all) build_image; run_stack_check ;;
        down) (cd "$ROOT" && "$PYTHON" -m tests.system.docker_stack --down) ;;
        *) die "unknown step '$what' (base-image | image | stack | all | down)" ;;
    esac
}

main "$@"
