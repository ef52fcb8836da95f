"""Static checks of the container, Kubernetes and HPC recipes in deploy/.

Nothing here runs Docker, Kubernetes or a batch system (none exists where
these tests run). The checks are that the files parse, that they agree with
each other and with deploy/README.md (image, ports, addresses, volumes, TLS
files, Secret and claim names), and that every command they run exists with
the options they pass: `dask-labelissues` commands are parsed by the real
parser, `dask scheduler`/`dask worker` flags are looked up in the installed
distributed's help, and distributed config keys set through DASK_* variables
are looked up in distributed's defaults.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from dask_labelissues.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
README = DEPLOY / "README.md"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DASKCLUSTER = DEPLOY / "kubernetes" / "daskcluster.yaml"
HELM_VALUES = DEPLOY / "kubernetes" / "helm-values.yaml"
JOB = DEPLOY / "kubernetes" / "job.yaml"
RUN_JOBQUEUE = DEPLOY / "hpc" / "run_jobqueue.py"
SUBMIT_SLURM = DEPLOY / "hpc" / "submit.slurm"

IMAGE = "dask-labelissues:0.1.0"
TLS_SECRET = "dask-labelissues-tls"
TLS_KEYS = {"ca.pem", "node.pem", "node.key"}
# The client/scheduler/worker flags every recipe passes, and the files
# deploy/tls/make-certs.sh writes, mounted at /certs.
TLS_FLAGS = {"--tls-ca-file": "/certs/ca.pem", "--tls-cert": "/certs/node.pem", "--tls-key": "/certs/node.key"}
DASK = str(Path(sys.executable).with_name("dask"))


# --------------------------------------------------------------------- helpers

def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def options(tokens: list[str]) -> dict[str, str]:
    """``--flag value`` and ``--flag=value`` pairs of a command (flags without
    a value map to "")."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            if "=" in tok:
                key, value = tok.split("=", 1)
                out[key] = value
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                out[tok] = tokens[i + 1]
                i += 1
            else:
                out[tok] = ""
        i += 1
    return out


def flags(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]


@functools.lru_cache(maxsize=None)
def dask_help(role: str) -> str:
    proc = subprocess.run([DASK, role, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def assert_dask_flags_exist(role: str, tokens: list[str], where: str) -> None:
    text = dask_help(role)
    for flag in flags(tokens):
        assert re.search(rf"(^|[\s/]){re.escape(flag)}(?=[\s,/=]|$)", text, re.M), \
            f"{where}: `dask {role}` has no option {flag}"


def assert_cli_parses(tokens: list[str], where: str):
    """Parse ``dask-labelissues ...`` tokens (without the program name) with
    the real parser; return the namespace."""
    parser = build_parser()
    try:
        namespace = parser.parse_args(tokens)
    except SystemExit:
        pytest.fail(f"{where}: `dask-labelissues {shlex.join(tokens)}` does not parse")
    # argparse accepts unambiguous abbreviations; a recipe should spell options out.
    known = subcommand_parser(parser, tokens[0])._option_string_actions
    for flag in flags(tokens):
        assert flag in known, f"{where}: `dask-labelissues {tokens[0]}` has no option {flag} (abbreviated?)"
    return namespace


def subcommand_parser(parser, name: str):
    [sub] = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices[name]


def assert_dask_config_keys(names, where: str) -> None:
    """Every DASK_DISTRIBUTED__... variable names an existing config key."""
    import dask
    import distributed  # noqa: F401  (loads distributed's defaults)

    for name in names:
        if not name.startswith("DASK_DISTRIBUTED__"):
            continue
        key = ".".join(name[len("DASK_"):].lower().split("__"))
        try:
            dask.config.get(key)
        except KeyError:
            pytest.fail(f"{where}: {name} sets {key}, which distributed does not have")


def readme() -> str:
    return README.read_text()


def shell_blocks(text: str) -> list[str]:
    """The ```bash blocks of a markdown text, with line continuations joined."""
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S)
    return [b.replace("\\\n", " ") for b in blocks]


def shell_lines(text: str) -> list[str]:
    return [line.strip() for block in shell_blocks(text) for line in block.splitlines() if line.strip()]


def container(pod_spec: dict, name: str) -> dict:
    [c] = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def env_of(c: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env") or []}


def mounts(c: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}


def volumes(pod_spec: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec.get("volumes") or []}


# ------------------------------------------------------------------- all YAML

ALL_YAML = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))


def test_recipes_are_present():
    for path in (README, COMPOSE, DOCKERFILE, DASKCLUSTER, HELM_VALUES, JOB, RUN_JOBQUEUE, SUBMIT_SLURM,
                 ROOT / ".dockerignore"):
        assert path.is_file(), path
    assert {COMPOSE, DASKCLUSTER, HELM_VALUES, JOB} <= set(ALL_YAML)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_in_deploy_parses(path):
    docs = load_all(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


# ------------------------------------------------------------- docker compose

@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_share_one_image_built_from_this_repo(compose):
    services = compose["services"]
    assert set(services) == {"scheduler", "worker", "jupyter"}
    for name, svc in services.items():
        assert svc["image"] == IMAGE, name
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE, name


def test_compose_scheduler_is_tls_only(compose):
    cmd = compose["services"]["scheduler"]["command"]
    assert cmd[:2] == ["dask", "scheduler"]
    opts = options(cmd)
    assert opts["--protocol"] == "tls"
    assert opts["--port"] == "8786"
    assert opts["--dashboard-address"] == ":8787"
    assert {k: opts[k] for k in TLS_FLAGS} == TLS_FLAGS
    assert_dask_flags_exist("scheduler", cmd[2:], "compose scheduler")


def test_compose_worker_points_at_the_scheduler(compose):
    services = compose["services"]
    sched = options(services["scheduler"]["command"])
    cmd = services["worker"]["command"]
    assert cmd[:2] == ["dask", "worker"]
    address = urlsplit(cmd[2])
    assert address.scheme == sched["--protocol"] == "tls"
    assert address.hostname in services  # a Compose service name resolves on its network
    assert address.hostname == "scheduler"
    assert str(address.port) == sched["--port"]
    opts = options(cmd[3:])
    assert opts["--nthreads"] == "2"
    assert opts["--memory-limit"] == "4GB"
    assert {k: opts[k] for k in TLS_FLAGS} == TLS_FLAGS
    assert services["worker"]["deploy"]["replicas"] == 2
    assert_dask_flags_exist("worker", cmd[3:], "compose worker")


def test_compose_every_service_mounts_data_and_certs(compose):
    assert "data" in compose["volumes"]
    for name, svc in compose["services"].items():
        vols = svc["volumes"]
        assert "data:/data" in vols, name
        certs = [v for v in vols if v.split(":")[1:2] == ["/certs"]]
        assert certs == ["./certs:/certs:ro"], name
    # ./certs is relative to the compose file: README's make-certs command must
    # write there, with the scheduler's service name on the certificate.
    assert "deploy/tls/make-certs.sh deploy/docker/certs scheduler" in readme()


def test_compose_jupyter_is_a_tls_client_by_environment(compose):
    services = compose["services"]
    jupyter = services["jupyter"]
    env = jupyter["environment"]
    assert env["DASK_SCHEDULER_ADDRESS"] == services["worker"]["command"][2]
    assert str(env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"]) == "True"
    assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"] == TLS_FLAGS["--tls-ca-file"]
    assert env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"] == TLS_FLAGS["--tls-cert"]
    assert env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"] == TLS_FLAGS["--tls-key"]
    assert_dask_config_keys(env, "compose jupyter")
    assert jupyter["command"][:2] == ["jupyter", "lab"]
    assert "--port=8888" in jupyter["command"]


def test_compose_publishes_dashboard_and_jupyter(compose):
    def published(svc):
        return {int(str(p).rsplit(":", 1)[-1]) for p in svc.get("ports", [])}

    services = compose["services"]
    assert published(services["scheduler"]) == {8787}
    assert published(services["jupyter"]) == {8888}
    assert published(services["worker"]) == set()  # replicas cannot share a host port


def test_readme_compose_commands_name_existing_services(compose):
    text = readme()
    assert "docker compose -f deploy/docker/compose.yaml up" in text
    services = set(compose["services"])
    prefix = "docker compose -f deploy/docker/compose.yaml "
    seen = set()
    # In code blocks and in inline `code` alike.
    for match in re.finditer(re.escape(prefix) + r"([^`\n]*)", text.replace("\\\n", " ")):
        line = match.group(0)
        words = shlex.split(match.group(1))
        verb, rest = words[0], words[1:]
        if verb in ("exec", "logs", "run"):
            named = [w for w in rest if not w.startswith("-")][:1]
        elif verb == "cp":
            named = [w.split(":", 1)[0] for w in rest if ":" in w]
        elif verb == "up":
            named = [w.split("=", 1)[0] for w in rest if "=" in w and not w.startswith("-")]
        else:
            named = []
        for service in named:
            assert service in services, f"README: `{line}` names no service of compose.yaml"
            seen.add(service)
    assert {"jupyter", "worker"} <= seen


# ------------------------------------------------------------------ Dockerfile

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_this_package_from_the_copied_source():
    instr = dockerfile_instructions(DOCKERFILE)
    froms = [arg for word, arg in instr if word == "FROM"]
    assert froms == ["python:3.11-slim"]
    copies = " ".join(arg for word, arg in instr if word == "COPY")
    assert "pyproject.toml" in copies and "dask_labelissues" in copies
    for src in ("pyproject.toml", "README.md", "LICENSE", "dask_labelissues"):
        assert (ROOT / src).exists()
    pips = [arg for word, arg in instr if word == "RUN" and "pip install" in arg]
    assert any("'.[hdf5,plot]'" in arg and "--no-cache-dir" in arg for arg in pips)
    assert not any(re.search(r"\s(-e|--editable)\s", arg) for arg in pips)
    assert not [arg for word, arg in instr if word == "ENTRYPOINT"]
    [cmd] = [arg for word, arg in instr if word == "CMD"]
    assert cmd == '["dask-labelissues", "--help"]'
    users = [arg for word, arg in instr if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    # numba's kernels are compiled as the runtime user, into a cache
    # directory it keeps (numba uses only one it can write to).
    words = [word for word, _ in instr]
    compile_at = instr.index(("RUN", "dask-labelissues compile"))
    assert compile_at > len(words) - 1 - words[::-1].index("USER")
    assert ("ENV", "NUMBA_CACHE_DIR=/home/dask/.cache/numba") in instr[:compile_at]


def test_dockerignore_keeps_the_context_small():
    patterns = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    for needed in (".git", ".venv", ".ci/venv", "benchmarks/data", "*.zarr"):
        assert needed in patterns, needed
    assert any("__pycache__" in p for p in patterns)
    # Nothing the Dockerfile copies may be ignored.
    assert not patterns & {"pyproject.toml", "README.md", "LICENSE", "dask_labelissues"}


# ----------------------------------------------------- Kubernetes: DaskCluster

@pytest.fixture(scope="module")
def k8s():
    docs = load_all(DASKCLUSTER)
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs) == 2
    return by_kind


def test_daskcluster_resource(k8s):
    dc = k8s["DaskCluster"]
    assert dc["apiVersion"] == "kubernetes.dask.org/v1"
    spec = dc["spec"]
    assert spec["worker"]["replicas"] == 2
    for role in ("worker", "scheduler"):
        c = container(spec[role]["spec"], role)
        assert c["image"] == IMAGE, role
        assert c["resources"]["requests"] and c["resources"]["limits"], role


def test_daskcluster_scheduler_is_tls_only_behind_its_service(k8s):
    dc = k8s["DaskCluster"]
    sched = dc["spec"]["scheduler"]
    c = container(sched["spec"], "scheduler")
    assert c["args"][:2] == ["dask", "scheduler"]
    opts = options(c["args"])
    assert opts["--protocol"] == "tls"
    assert {k: opts[k] for k in TLS_FLAGS} == TLS_FLAGS
    assert_dask_flags_exist("scheduler", c["args"][2:], "DaskCluster scheduler")
    [comm] = [p for p in sched["service"]["ports"] if p["name"] == "tcp-comm"]
    [port] = [p for p in c["ports"] if p["name"] == "tcp-comm"]
    assert str(comm["port"]) == str(port["containerPort"]) == opts["--port"]
    assert sched["service"]["selector"]["dask.org/cluster-name"] == dc["metadata"]["name"]
    assert_dask_config_keys(env_of(c), "DaskCluster scheduler")
    routes = env_of(c)["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"]
    assert "distributed.http.scheduler.api" in routes and "distributed.http.health" in routes


def test_daskcluster_workers_use_the_tls_service_address(k8s):
    dc = k8s["DaskCluster"]
    name = dc["metadata"]["name"]
    [comm] = [p for p in dc["spec"]["scheduler"]["service"]["ports"] if p["name"] == "tcp-comm"]
    c = container(dc["spec"]["worker"]["spec"], "worker")
    assert c["args"][:2] == ["dask", "worker"]
    # The operator's Service is "<name>-scheduler"; setting the variable stops
    # the operator from injecting its tcp:// default.
    assert env_of(c)["DASK_SCHEDULER_ADDRESS"] == f"tls://{name}-scheduler:{comm['port']}"
    assert "$(DASK_SCHEDULER_ADDRESS)" in c["args"]
    opts = options(c["args"])
    assert {k: opts[k] for k in TLS_FLAGS} == TLS_FLAGS
    assert_dask_flags_exist("worker", [a for a in c["args"][2:] if not a.startswith("$(")], "DaskCluster worker")


def test_daskcluster_mounts_the_tls_secret_and_the_shared_claim(k8s):
    pvc = k8s["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "labelissues-data"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # README's Helm recipe applies only the claim with this selector.
    assert pvc["metadata"]["labels"]["app.kubernetes.io/component"] == "data"
    assert "-l app.kubernetes.io/component=data" in readme()
    assert "labels" not in k8s["DaskCluster"]["metadata"]
    for role in ("worker", "scheduler"):
        pod = k8s["DaskCluster"]["spec"][role]["spec"]
        vols, mnt = volumes(pod), mounts(container(pod, role))
        assert vols[mnt["/certs"]]["secret"]["secretName"] == TLS_SECRET, role
    pod = k8s["DaskCluster"]["spec"]["worker"]["spec"]
    vols, mnt = volumes(pod), mounts(container(pod, "worker"))
    assert vols[mnt["/data"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


# ---------------------------------------------------------- Kubernetes: Job

def test_job_runs_find_against_the_daskcluster(k8s):
    [job] = load_all(JOB)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [c] = pod["containers"]
    assert c["image"] == IMAGE
    assert c["args"][:2] == ["dask-labelissues", "find"]
    args = assert_cli_parses(c["args"][1:], "job.yaml")
    dc = k8s["DaskCluster"]
    [comm] = [p for p in dc["spec"]["scheduler"]["service"]["ports"] if p["name"] == "tcp-comm"]
    assert args.scheduler == f"tls://{dc['metadata']['name']}-scheduler:{comm['port']}"
    assert (args.tls_ca_file, args.tls_cert, args.tls_key) == tuple(TLS_FLAGS.values())
    for path in (args.labels, args.pred_probs, args.output):
        assert path.startswith("/data/")
    vols, mnt = volumes(pod), mounts(c)
    assert vols[mnt["/certs"]]["secret"]["secretName"] == TLS_SECRET
    claim = k8s["PersistentVolumeClaim"]["metadata"]["name"]
    assert vols[mnt["/data"]]["persistentVolumeClaim"]["claimName"] == claim


# ------------------------------------------------------- Kubernetes: Helm values

@pytest.fixture(scope="module")
def helm():
    [values] = load_all(HELM_VALUES)
    return values


def test_helm_values_use_the_image_and_two_workers(helm):
    for role in ("scheduler", "worker", "jupyter"):
        image = helm[role]["image"]
        assert f"{image['repository']}:{image['tag']}" == IMAGE, role
    assert helm["worker"]["replicas"] == 2


def test_helm_values_turn_on_tls_for_every_role(helm):
    # README installs the release as "labelissues": the chart's scheduler
    # Service is then "labelissues-dask-scheduler".
    assert "helm install labelissues dask/dask -f deploy/kubernetes/helm-values.yaml" in readme()
    assert helm["worker"]["custom_scheduler_url"] == "tls://labelissues-dask-scheduler:8786"
    assert options(helm["scheduler"]["extraArgs"])["--protocol"] == "tls"
    roles = {"scheduler": "SCHEDULER", "worker": "WORKER", "jupyter": "CLIENT"}
    for role, tls_role in roles.items():
        env = {e["name"]: e for e in helm[role]["env"]}
        assert_dask_config_keys(env, f"helm {role}")
        need = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
                f"DASK_DISTRIBUTED__COMM__TLS__{tls_role}__CERT",
                f"DASK_DISTRIBUTED__COMM__TLS__{tls_role}__KEY"}
        assert need <= set(env), role
        for name in need:
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == TLS_SECRET and ref["key"] in TLS_KEYS, (role, name)
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"]["value"] == "True", role
    jupyter_env = {e["name"]: e for e in helm["jupyter"]["env"]}
    assert jupyter_env["DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME"]["value"] == "tls"


def test_helm_values_mount_the_shared_claim(helm, k8s):
    claim = k8s["PersistentVolumeClaim"]["metadata"]["name"]
    for role in ("worker", "jupyter"):
        m = helm[role]["mounts"]
        vols = {v["name"]: v for v in m["volumes"]}
        [data] = [vm for vm in m["volumeMounts"] if vm["mountPath"] == "/data"]
        assert vols[data["name"]]["persistentVolumeClaim"]["claimName"] == claim, role


# --------------------------------------------------------------------- README

def test_readme_sections():
    text = readme()
    assert "## Local cluster (deploy/local)" in text
    assert "## What was run here and what was not" in text
    assert "NOT" in text.split("## What was run here and what was not", 1)[1]


def test_readme_paths_exist():
    text = readme()
    # (not `kubectl exec deploy/NAME`, a Kubernetes Deployment)
    for path in set(re.findall(r"(?<![\w/])deploy/(?:docker|kubernetes|hpc|local|tls)\b[\w./-]*[\w/]", text)):
        if "certs" in Path(path).parts:  # made by make-certs.sh, never committed
            continue
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"


def test_readme_dask_labelissues_commands_parse():
    found = 0
    for line in shell_lines(readme()):
        if "dask-labelissues " not in line:
            continue
        tokens = shlex.split(line[line.index("dask-labelissues "):])
        assert_cli_parses(tokens[1:], "deploy/README.md")
        found += 1
    assert found >= 4


def test_readme_run_jobqueue_commands_parse():
    spec = importlib.util.spec_from_file_location("run_jobqueue", RUN_JOBQUEUE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only; imports nothing optional
    found = 0
    for line in shell_lines(readme()):
        if "deploy/hpc/run_jobqueue.py" not in line:
            continue
        tokens = shlex.split(line[line.index("deploy/hpc/run_jobqueue.py"):])
        module.parse_args(tokens[1:])
        found += 1
    assert found >= 1


# ------------------------------------------------------------------------ HPC

def test_run_jobqueue_help_runs_without_dask_jobqueue():
    proc = subprocess.run([sys.executable, str(RUN_JOBQUEUE), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--system" in proc.stdout and "--certs" in proc.stdout
    # Even where dask-jobqueue is installed, --help must not import it.
    blocked = (
        "import runpy, sys; sys.modules['dask_jobqueue'] = None; "
        f"sys.argv = ['run_jobqueue.py'] + sys.argv[1:]; runpy.run_path({str(RUN_JOBQUEUE)!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", blocked, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_run_jobqueue_without_dask_jobqueue_says_how_to_install(tmp_path):
    blocked = (
        "import runpy, sys; sys.modules['dask_jobqueue'] = None; "
        f"sys.argv = ['run_jobqueue.py'] + sys.argv[1:]; runpy.run_path({str(RUN_JOBQUEUE)!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocked, "--system", "slurm", "--labels", "l.npy", "--pred-probs", "p.npy",
         "--output", str(tmp_path / "out.zarr"), "--certs", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "pip install dask-jobqueue" in proc.stderr


def test_submit_slurm_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SUBMIT_SLURM)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_submit_slurm_commands_exist_with_their_options():
    text = SUBMIT_SLURM.read_text().replace("\\\n", " ")
    assert re.search(r"^#SBATCH --nodes=", text, re.M)
    commands = {"scheduler": None, "worker": None, "find": None}
    for line in text.splitlines():
        for key, marker in (("scheduler", "dask scheduler "), ("worker", "dask worker "),
                            ("find", "dask-labelissues find ")):
            if marker in line and not line.lstrip().startswith("#"):
                commands[key] = line[line.index(marker) + len(marker):]
    assert all(commands.values()), commands
    for role in ("scheduler", "worker"):
        tokens = commands[role].split()
        assert "--scheduler-file" in tokens, role
        assert_dask_flags_exist(role, tokens, f"submit.slurm {role}")
    assert "--protocol tls" in commands["scheduler"]
    known = subcommand_parser(build_parser(), "find")._option_string_actions
    for flag in flags(commands["find"].split()):
        assert flag in known, f"submit.slurm: `dask-labelissues find` has no option {flag}"
