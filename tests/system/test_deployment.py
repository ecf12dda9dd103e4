"""The hospital deployment: Dockerfile, docker-compose.yml,
scripts/make_certificates.py and docs/deployment.md.

No Docker engine is needed: docker-compose.yml is validated against the Compose
Specification's JSON schema (tests/data/compose-spec.json) and checked for what
the deployment promises (TLS, node authentication, the photos seen only by each
hospital's network-less firewall service, ...), and the end-to-end test starts
the services of that very file as plain processes on 127.0.0.1: the commands,
flags, node config and environment are taken from docker-compose.yml and the
Dockerfile, with container paths mapped to folders under tmp_path and service
addresses to free local ports. tests/system/test_docker_stack.py (slow) runs the same
file under a real Docker engine.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from scripts import make_certificates
from tests.conftest import TINY_OVERRIDES
from tests.system.compose_files import (
    BIN,
    COMPOSE,
    DOCKERFILE,
    DOCS,
    HOSPITALS,
    ROOT,
    dockerfile_env,
    dockerfile_instructions,
    flag_value,
    flwr_parsers,
    flwr_version,
    hospital_services,
    interpolate,
    is_bind,
    program_parsers,
    read_compose,
    service_argv,
    service_environment,
    service_mounts,
    service_roles,
    watch_args,
)
from tests.system.local_deployment import (
    LocalDeployment,
    aggregated,
    flwr,
    hospital_folders,
    wait_for_firewall,
    wait_for_port,
)


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(read_compose())]
    assert not errors, errors
    # The schema is strict enough to catch mistakes.
    broken = read_compose()
    broken["services"]["superlink"]["volume"] = []
    assert list(validator.iter_errors(broken))


def test_compose_services_use_the_image_and_flags_of_this_flwr():
    compose = read_compose()
    roles = service_roles(compose)
    assert roles == {
        "flower-superlink": ["superlink"],
        "flower-superexec": ["serverapp", "clientapp-1", "clientapp-2"],
        "flower-supernode": ["supernode-1", "supernode-2"],
        "privacy-firewall": ["firewall-1", "firewall-2"],
    }
    # Debian's docker-compose 1.29 rejects a top-level `name:`; `version:` is obsolete in both.
    assert "name" not in compose and "version" not in compose
    parsers = program_parsers()
    for name, service in compose["services"].items():
        assert service["image"] == "skinfed:0.1.0", name
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert service.get("init") is True, f"{name}: SuperExec's app processes need an init to be reaped"
        argv = service_argv(service)
        assert (BIN / argv[0]).is_file(), f"{name}: {argv[0]} is not a program of the installed flwr"
        parser = parsers[argv[0]]()
        try:
            parser.parse_args(argv[1:])  # every flag exists, every value is accepted
        except SystemExit:
            pytest.fail(f"{name}: {argv[0]} of flwr {flwr_version()} rejects {argv[1:]}")
        deprecated = {opt for action in parser._actions for opt in action.option_strings
                      if "deprecated" in (action.help or "").lower()}
        used = {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")}
        assert not used & deprecated, f"{name} uses deprecated flags {used & deprecated}"
        # Files named on the command line are mounted into that container.
        targets = [t for _, t, _ in service_mounts(service)]
        for arg in argv[1:]:
            value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
            if value.startswith("/certs/"):
                assert value in targets, f"{name}: {value} is not mounted"
    declared_volumes = set(compose.get("volumes", {}))
    declared_networks = set(compose.get("networks", {}))
    for name, service in compose["services"].items():
        for source, _, _ in service_mounts(service):
            assert is_bind(source) or source in declared_volumes, f"{name}: volume {source} is not declared"
        assert set(service.get("networks", [])) <= declared_networks
        assert service.get("networks") or service.get("network_mode") == "none", f"{name}: no network chosen"


def test_compose_deployment_is_authenticated_encrypted_and_private():
    compose = read_compose()
    services = compose["services"]
    networks = compose["networks"]

    link = service_argv(services["superlink"])
    for flag, path in [("--ssl-ca-certfile", "/certs/ca.crt"), ("--ssl-certfile", "/certs/superlink.crt"),
                       ("--ssl-keyfile", "/certs/superlink.key")]:
        assert flag_value(link, flag) == path
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert flag_value(link, "--isolation") == "process"
    database = flag_value(link, "--database")
    state = [(s, t) for s, t, ro in service_mounts(services["superlink"]) if database.startswith(t + "/") and not ro]
    assert state and not is_bind(state[0][0]), "the SuperLink's state must live on a named volume"
    link_port = flag_value(link, "--port")
    assert any(str(p).endswith(f":{link_port}") for p in services["superlink"]["ports"])

    server = service_argv(services["serverapp"])
    assert flag_value(server, "--runtime-api-address") == f"superlink:{link_port}"
    assert flag_value(server, "--root-certificates") == "/certs/ca.crt" and "--insecure" not in server
    assert flag_value(server, "--superexec-auth-secret-file") == flag_value(link, "--superexec-auth-secret-file")
    assert all(networks[n].get("internal") for n in services["serverapp"]["networks"])

    # The SuperLink is published on loopback unless the coordinator says otherwise.
    published = [interpolate(str(p), {}) for p in services["superlink"]["ports"]]
    assert published == [f"127.0.0.1:9093:{link_port}"]
    assert interpolate(str(services["superlink"]["ports"][0]), {"SUPERLINK_BIND_ADDRESS": "10.1.2.3"}).startswith(
        "10.1.2.3:")

    from flwr.common.config import parse_config_args

    data_sources: dict[str, str] = {}
    for h, (node_name, app_name, firewall_name) in hospital_services().items():
        node, app, firewall = services[node_name], services[app_name], services[firewall_name]
        node_argv, app_argv = service_argv(node), service_argv(app)
        # The SuperNode: TLS to the SuperLink, its own key, no patient data.
        assert flag_value(node_argv, "--superlink") == f"superlink:{link_port}"
        assert flag_value(node_argv, "--root-certificates") == "/certs/ca.crt" and "--insecure" not in node_argv
        key = flag_value(node_argv, "--auth-supernode-private-key")
        key_source = next(s for s, t, ro in service_mounts(node) if t == key and ro)
        assert key_source.endswith(f"/supernode-{h}")
        assert flag_value(node_argv, "--isolation") == "process"
        config = parse_config_args([flag_value(node_argv, "--node-config")])
        assert set(config) == {"deidentified-path", "partition-id"}
        assert config["partition-id"] == int(h) - 1
        assert not any(t == config["deidentified-path"] for _, t, _ in service_mounts(node))
        # Its ClientApp SuperExec: talks to this SuperNode only, over the hospital's internal network.
        assert flag_value(app_argv, "--runtime-api-address") == f"{node_name}:{flag_value(node_argv, '--port')}"
        assert flag_value(app_argv, "--superexec-auth-secret-file") == flag_value(node_argv, "--superexec-auth-secret-file")
        assert set(app["networks"]) == {f"hospital-{h}"} and networks[f"hospital-{h}"].get("internal") is True
        users = {n for n, s in services.items() if f"hospital-{h}" in s.get("networks", [])}
        assert users == {node_name, app_name}
        # The ClientApp mounts the firewall's published pairs, read-only, and nothing else of the hospital's.
        app_mounts = service_mounts(app)
        published = [(s, ro) for s, t, ro in app_mounts if t == config["deidentified-path"]]
        assert published == [(f"hospital-{h}-deidentified", True)], f"{app_name}: {app_mounts}"
        assert {t for _, t, _ in app_mounts} == {config["deidentified-path"], flag_value(app_argv, "--superexec-auth-secret-file")}
        # The firewall service: the photos read-only, no network at all, publishing what the ClientApp reads.
        watch = watch_args(firewall)
        fw_mounts = service_mounts(firewall)
        assert firewall.get("network_mode") == "none" and "networks" not in firewall and "ports" not in firewall
        data = [(s, ro) for s, t, ro in fw_mounts if t == watch.photos_dir]
        assert len(data) == 1 and data[0][1] and is_bind(data[0][0]), f"{firewall_name}: photos must be one read-only mount"
        data_sources[h] = data[0][0]
        assert [(s, ro) for s, t, ro in fw_mounts if t == watch.publish] == [(f"hospital-{h}-deidentified", False)]
        work = [(s, ro) for s, t, ro in fw_mounts if t == watch.work_dir]
        assert work == [(f"hospital-{h}-firewall", False)]
        assert all(ro for s, t, ro in fw_mounts if t == "/models"), "SD3/FLUX weights are mounted read-only"
        assert service_environment(firewall, {"HOSPITAL_1_OVERRIDES": "x", "HOSPITAL_2_OVERRIDES": "y"})["SKINFED_OVERRIDES"] \
            == {"1": "x", "2": "y"}[h]
        # A GPU for the firewall and the ClientApp, which CPU-only hosts drop.
        for service in (app, firewall):
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices and "gpu" in devices[0]["capabilities"]
    # No service but a hospital's own firewall sees its photos; no two hospitals share a folder or volume.
    assert len(set(data_sources.values())) == len(HOSPITALS)
    for h, source in data_sources.items():
        seen_by = {n for n, s in services.items() for src, _, _ in service_mounts(s) if src == source}
        assert seen_by == {f"firewall-{h}"}
    for name, service in services.items():
        for source, _, _ in service_mounts(service):
            if source.startswith("hospital-"):
                h = source.split("-")[1]
                allowed = {f"firewall-{h}"} if source.endswith("-firewall") else {f"firewall-{h}", f"clientapp-{h}"}
                assert name in allowed, (name, source)
    # A node's private key and secrets are mounted where they belong only.
    for name, service in services.items():
        for source, _, _ in service_mounts(service):
            base = Path(source).name
            if re.fullmatch(r"supernode-\d+(\.superexec-secret)?", base):
                assert name in (f"supernode-{base.split('-')[1].split('.')[0]}",
                                f"clientapp-{base.split('-')[1].split('.')[0]}"), (name, base)
                if "." not in base:
                    assert name.startswith("supernode-"), f"{name} must not hold a node's private key"
            if base in ("ca.key", "superlink.key"):
                assert name == "superlink" and base == "superlink.key", (name, base)
    # Secrets and keys never reach a firewall service.
    for h in HOSPITALS:
        assert not any("/certs" in t for _, t, _ in service_mounts(services[f"firewall-{h}"]))


def test_dockerfile_builds_a_non_root_offline_runtime():
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    base = next(rest for w, rest in instructions if w == "FROM")
    args = {k: v for w, rest in instructions if w == "ARG" and "=" in rest for k, v in [rest.split("=", 1)]}
    image = interpolate(base, args)
    assert "cuda" in image.lower(), image
    users = [interpolate(rest, args) for w, rest in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0", ""), "the containers must not run as root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    env = dockerfile_env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    runs = " ".join(rest for w, rest in instructions if w == "RUN")
    assert re.search(r"pip install [^&]*/tmp/skinfed-src", runs) and "-e " not in runs
    assert "find_embedded_weights" in runs, "the build checks that the embedded model shipped"
    assert args["FLWR_VERSION"] == flwr_version(), "the image pins the flwr that the compose flags are tested with"
    # From the build context (not from an earlier stage: COPY --from=...).
    copies = [rest.split() for w, rest in instructions if w == "COPY" and "--from=" not in rest]
    for parts in copies:
        for source in [p for p in parts[:-1] if not p.startswith("--")]:
            assert (ROOT / source).exists(), source
            assert not source.startswith(("deploy", "runs", ".venv", "tests")), source
    assert any("models/" in parts[:-1] for parts in copies), "the embedded model is copied and installed"
    entry = json.loads(next(rest for w, rest in instructions if w == "ENTRYPOINT"))
    assert entry == ["flower-superexec"]
    assert not DOCKERFILE.read_text().startswith("# syntax="), "BuildKit would pull a frontend from a registry"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for must in (".venv", "deploy", "runs", "*.key", ".env"):
        assert must in ignored
    # The flower programs the compose file runs are console scripts of the installed flwr.
    for program in ("flower-superlink", "flower-supernode", "flower-superexec"):
        assert (BIN / program).is_file()


def test_make_certificates_writes_what_flwr_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    out = tmp_path / "certs"
    mine = f"{os.getuid()}:{os.getgid()}"
    assert make_certificates.main([str(out), "--nodes", "2", "--san", "fl.example.org", "--san", "10.0.0.7",
                                   "--owner", mine]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"ca.crt", "ca.key", "superlink.crt", "superlink.key", "superlink.superexec-secret",
                     "supernode-1", "supernode-1.pub", "supernode-1.superexec-secret",
                     "supernode-2", "supernode-2.pub", "supernode-2.superexec-secret"}
    for name in names:
        mode = stat.S_IMODE((out / name).stat().st_mode)
        private = name.endswith((".key", "-secret")) or re.fullmatch(r"supernode-\d", name)
        assert mode == (0o600 if private else 0o644), (name, oct(mode))

    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink", "fl.example.org"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.7"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}

    for i in (1, 2):
        private = load_ssh_private_key((out / f"supernode-{i}").read_bytes(), None)  # as flower-supernode does
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = load_ssh_public_key((out / f"supernode-{i}.pub").read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        assert try_load_public_key(out / f"supernode-{i}.pub")  # as `flwr supernode register` does
        secret = (out / f"supernode-{i}.superexec-secret").read_bytes()
        assert len(secret) == 64 and b"\n" not in secret

    # Nothing is overwritten by accident; a hospital can make its own key pair alone.
    before = (out / "supernode-1").read_bytes()
    assert make_certificates.main([str(out), "--owner", mine]) == 1
    assert (out / "supernode-1").read_bytes() == before
    assert make_certificates.main([str(tmp_path / "site"), "--node-key-only", "hospital-9", "--owner", "keep"]) == 0
    assert {p.name for p in (tmp_path / "site").iterdir()} == {
        "hospital-9", "hospital-9.pub", "hospital-9.superexec-secret"}


def test_make_certificates_gives_the_files_to_the_containers_user(tmp_path):
    """The quick-start's keys must be readable by the containers' uid (1000 by default)."""
    assert make_certificates.build_parser().parse_args([str(tmp_path)]).owner == "1000:1000"
    if os.geteuid() == 0:
        out = tmp_path / "as-root"
        assert make_certificates.main([str(out), "--owner", "1234:4321"]) == 0
        owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in out.iterdir()}
        assert owners.pop("ca.key") == (0, 0)  # mounted nowhere: stays with whoever made it
        assert set(owners.values()) == {(1234, 4321)}
    else:  # another user's files cannot be made: refuse before writing anything, and say what to do
        other = os.geteuid() + 1
        assert make_certificates.main([str(tmp_path / "refused"), "--owner", f"{other}:{other}"]) == 1
        assert not (tmp_path / "refused").exists()


def _client_metric_keys() -> set[str]:
    """The keys of every MetricRecord the ClientApp sends back: the fields of the
    replies in skinfed/hospital_replies.py, which client/app.py builds its records from."""
    from skinfed.hospital_replies import SENT_KEYS

    tree = ast.parse((ROOT / "client" / "app.py").read_text())
    literal = [node for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MetricRecord"
               and node.args and isinstance(node.args[0], ast.Dict)]
    assert not literal, "client/app.py builds a MetricRecord by hand: use the replies of skinfed.hospital_replies"
    return set(SENT_KEYS)


def test_deployment_docs_match_the_files():
    text = DOCS.read_text()
    compose = read_compose()
    for name in compose["services"]:
        assert f"`{name}`" in text, f"docs/deployment.md does not mention the service {name}"
    for variable in sorted(set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))):
        assert variable in text, f"docs/deployment.md does not explain ${variable}"
    for name in ("ca.crt", "ca.key", "superlink.crt", "superlink.key", "superlink.superexec-secret",
                 "supernode-1.pub", "supernode-1.superexec-secret"):
        assert name in text
    # "What leaves a hospital" lists exactly the ClientApp's metrics.
    section = text.split("## What leaves a hospital", 1)[1].split("\n## ", 1)[0]
    paragraphs = section.split("\n\n")
    listed = set(re.findall(r"`([\w-]+)`", paragraphs[1]))
    assert listed == _client_metric_keys() == {"train_loss", "num-examples", "firewall_accepted",
                                               "firewall_refused", "dice", "iou", "loss",
                                               "ready", "done", "total", "accepted", "refused"}
    # and, with patient-level DP, exactly the accounting a training reply adds, or the
    # reply of a hospital past its budget
    from skinfed.hospital_replies import BudgetSpent
    from skinfed.patient_privacy import accounting_metrics

    with_dp = set(re.findall(r"`([\w-]+)`", paragraphs[2])) - {"train_loss"}
    assert with_dp == set(accounting_metrics([(1.0, 0.1, 10)], 1e-5, 1.0)) | set(BudgetSpent.keys())
    # Every flag the docs show exists: in this flwr's programs, in make_certificates, or
    # these few of the flwr CLI (`flwr run`, `flwr supernode`) and `docker compose up`.
    parsers = [*(build() for build in flwr_parsers().values()), make_certificates.build_parser()]
    from privacy_firewall.cli import build_parser as firewall_parser

    watch = firewall_parser()._subparsers._group_actions[0].choices["watch"]
    known = {o for parser in [*parsers, watch] for a in parser._actions for o in a.option_strings}
    known |= {"--stream", "--run-config", "--format", "--no-deps", "--build-arg", "--project-name", "--rm",
              "--network", "--volume", "--entrypoint"}
    unknown = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)) - known
    assert not unknown, f"docs/deployment.md shows flags that do not exist: {unknown}"
    assert f":{flag_value(service_argv(compose['services']['superlink']), '--port')}" in text
    # Commands for Debian's docker-compose 1.29 and Compose v2 alike: no v2-only subcommands.
    assert "compose cp" not in text and "docker-compose cp" not in text
    assert "docker-compose config" in text and "DOCKER-USER" in text


# In the default run (CI keeps the loopback test): ~3 min on 2 idle cores.
def test_compose_deployment_runs_one_round_on_loopback(tmp_path, tiny_embedded_dir):
    """Each hospital's firewall service de-identifies its photos first; then the
    SuperLink (TLS, node authentication, process isolation) + its ServerApp
    SuperExec, two enrolled hospitals (SuperNode + ClientApp SuperExec, each
    reading only its own firewall's published pairs), one round through
    `flwr run --stream`, and a third SuperNode whose key was never registered,
    which is refused."""
    started = time.time()
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    certs = tmp_path / "certs"
    make_certificates.write_all(certs, nodes=2, sans=[], days=2, force=False)
    make_certificates.write_node_keys(certs, "supernode-3", force=False)  # never registered
    hospitals = hospital_folders(tmp_path)
    (tmp_path / "models").mkdir()

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SKINFED_", "FLWR_"))}
    base_env.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                     "SKINFED_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    # The hospitals' own settings: the firewall services run on the tiny model.
    hospital_overrides = " ".join([f"firewall.backend.model_path={tiny_embedded_dir}", *TINY_OVERRIDES])
    host_env = {"SKINFED_CERTS": str(certs), "HOSPITAL_1_DATA": str(hospitals[0]),
                "HOSPITAL_2_DATA": str(hospitals[1]), "SKINFED_MODELS": str(tmp_path / "models"),
                "HOSPITAL_1_OVERRIDES": hospital_overrides, "HOSPITAL_2_OVERRIDES": hospital_overrides}
    deployment = LocalDeployment(tmp_path / "deployment", host_env, base_env)
    # A third SuperNode exactly like the first, with its own, unregistered key.
    rogue = copy.deepcopy(deployment.compose["services"]["supernode-1"])
    rogue["command"] = [a.replace("supernode-1", "supernode-3") for a in rogue["command"]]
    rogue["volumes"] = [v.replace("supernode-1", "supernode-3") for v in rogue["volumes"]]
    deployment.add_service("supernode-3", rogue)

    cli_home = tmp_path / "flwr-cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        '[superlink]\ndefault = "skinfed"\n\n[superlink.skinfed]\n'
        f'address = "127.0.0.1:{deployment.port("superlink")}"\nroot-certificates = "{certs / "ca.crt"}"\n')
    cli_env = {**base_env, "FLWR_HOME": str(cli_home), "FLWR_TELEMETRY_ENABLED": "0"}
    overrides = [f"firewall.backend.model_path={tiny_embedded_dir}", *TINY_OVERRIDES, "federation.num_hospitals=2",
                 "federation.num_rounds=1", "federation.connect_timeout=240"]
    volumes = tmp_path / "deployment" / "volumes"
    try:
        for h in HOSPITALS:  # the firewalls first: de-identification is done before and outside Flower
            firewall = deployment.start(f"firewall-{h}")
            wait_for_firewall(volumes / f"hospital-{h}-deidentified", firewall)
        link = deployment.start("superlink")
        wait_for_port(deployment.port("superlink"), link)
        for h in HOSPITALS:  # enrol the two hospitals
            reg = flwr(["supernode", "register", str(certs / f"supernode-{h}.pub"), "skinfed", "--format", "json"],
                        cli_env, tmp_path, timeout=120)
            assert reg.returncode == 0 and json.loads(reg.stdout)["success"], reg.stdout + reg.stderr
        for name in ("serverapp", "supernode-1", "clientapp-1", "supernode-2", "clientapp-2", "supernode-3"):
            deployment.start(name)

        run = flwr(["run", str(ROOT), "skinfed", "--stream", "--run-config",
                     "overrides=" + json.dumps(" ".join(overrides))], cli_env, tmp_path, timeout=480)
        stream = run.stdout + run.stderr
        assert run.returncode == 0 and "done: 1 rounds" in stream, stream[-4000:] + deployment.tails()

        # The server's run directory, on the serverapp's work volume.
        run_dir = Path(re.search(r"results in (\S+)", stream)[1])
        assert run_dir.is_relative_to(tmp_path / "deployment" / "volumes" / "server-work" / "runs")
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [0, 1]
        assert rounds[1]["clients_trained"] == 2 and rounds[1]["clients_failed"] == 0
        assert len(rounds[1]["hospitals_trained"]) == 2 and rounds[1]["hospitals_missed"] == []
        assert rounds[1]["firewall_accepted"] == 8 and rounds[1]["firewall_refused"] == 0
        assert rounds[1]["global_dice"] is not None and rounds[1]["client_dice"] is not None
        # Each hospital's firewall published its pairs; the full output (manifest) stayed in its own volume.
        from privacy_firewall.watch import read_status

        for h in HOSPITALS:
            status = read_status(volumes / f"hospital-{h}-deidentified")
            assert status.ready and status.ok == 4
            assert not list((volumes / f"hospital-{h}-deidentified").rglob("manifest.local.csv"))
            assert (volumes / f"hospital-{h}-firewall" / "output" / "manifest.local.csv").is_file()
        # Only the documented metrics came back, and nothing local reached the researcher's screen.
        # (counts are summed over the hospitals, the number of examples with them)
        assert aggregated(stream, "train") == {"train_loss", "firewall_accepted", "firewall_refused", "num-examples"}
        assert aggregated(stream, "evaluate") == {"dice", "iou", "loss", "num-examples"}
        for folder in hospitals:
            assert str(folder) not in stream
            assert not any(p.stem in stream for p in (folder / "images").iterdir())

        # The unregistered SuperNode was refused and is gone; the two hospitals are online.
        rogue_proc = deployment.procs["supernode-3"]
        try:
            rogue_proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the SuperNode with an unregistered key is still running\n" + deployment.log("supernode-3"))
        assert rogue_proc.returncode != 0
        assert "Failed to activate SuperNode" in deployment.log("supernode-3")
        assert "No SuperNode found with the given public key" in deployment.log("superlink")
        nodes = flwr(["supernode", "list", "skinfed", "--format", "json"], cli_env, tmp_path, timeout=120)
        listed = json.loads(nodes.stdout)["nodes"]
        assert len(listed) == 2 and all(n["status"] == "online" for n in listed), nodes.stdout
    finally:
        deployment.stop()
        leftovers = deployment.leftovers()
        print(f"loopback deployment test: {time.time() - started:.0f} s")
        assert not leftovers, f"processes left running: {leftovers}"
        assert hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() == pyproject
