"""``c2m``: run the DAG, show its plan, serve and manage the registered models.

Heavy libraries (Prefect, torch, transformers) are imported inside the commands that need them,
so ``c2m --help`` answers at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _project_env(cfg=None) -> None:
    """Keep Prefect's and Hugging Face's state inside the project (ENVIRONMENT.md); never overrides
    what the user exported."""
    home = Path.cwd()
    defaults = {
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # Slot leases on disk under PREFECT_HOME, not in one server's memory: every server of the project
        # (`c2m server`, each run's temporary one) then sees every live holder of the GPU slot, and a killed
        # run's slot can be told from a live one (flows/prefect_tasks.py recover_gpu_slots).
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    if cfg is not None:
        defaults["PREFECT_LOCAL_STORAGE_PATH"] = str(Path(cfg.paths.store).resolve() / "_prefect_results")
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


def _parse_set(values: list[str]) -> dict:
    """``--set finetune.learning_rate=1e-4`` -> {"finetune.learning_rate": 0.0001} (YAML scalars)."""
    from corpus2model.schemas.config import ConfigError, parse_overrides

    try:
        return parse_overrides(values)
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def _load(args):
    from corpus2model.schemas.config import ConfigError, load_config

    try:
        return load_config(args.config, _parse_set(getattr(args, "set", None)))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_run(args) -> int:
    cfg = _load(args)
    _project_env(cfg)
    from corpus2model.flows.runners import prefect_api

    flows = []

    def load_code() -> None:
        """Imports Prefect and every stage module (seconds): done while the temporary server boots."""
        from corpus2model.flows.plan import check_runtime
        from corpus2model.flows.runners import flow_for
        from corpus2model.schemas.config import ConfigError

        try:
            check_runtime(cfg.runtime)
        except ConfigError as e:
            raise SystemExit(f"error: {args.config}: {e}") from None
        flows.append(flow_for(cfg))

    try:
        with prefect_api(cfg, before_wait=load_code):
            result = flows[0](config_path=str(args.config), overrides=_parse_set(args.set))
    except Exception as e:
        from corpus2model.tasks.stage import StageError

        if not isinstance(e, StageError):
            raise
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print()
    for k, v in result["links"].items():
        print(f"{k:18s} {v}")
    print(f"{'run summary':18s} {result['summary']}")
    return 0


def cmd_status(args) -> int:
    cfg = _load(args)
    _project_env(cfg)
    from corpus2model.tasks.ingest import scan_raw
    from corpus2model.flows.plan import plan
    from corpus2model.tasks.stage import StageError, Store

    store = Store(cfg.paths.store)
    try:
        source = scan_raw(cfg.paths.raw, cfg.ingest.include, store)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    steps = plan(cfg, store, source)
    print(f"plan for {args.config} ({source.stats['files']} raw files, {source.stats['bytes']:,} bytes); nothing is run\n")
    print(f"{'stage':10s} {'status':9s} {'key':12s} why")
    for s in steps:
        why = s.why if not s.cached or s.why != "cached" else ""  # a cached entry can carry a code-change note
        if s.detail:
            why = f"{why} ({s.detail})"
        print(f"{s.stage:10s} {'cached' if s.cached else 'will run':9s} {s.key[:10]:12s} {why}")
    n = sum(not s.cached for s in steps)
    print(f"\n{n} of {len(steps)} stages would run")
    return 0


def cmd_serve(args) -> int:
    cfg = _load(args)
    _project_env(cfg)
    from corpus2model.flows.serve import serve

    serve(cfg, host=args.host, port=args.port, ref=args.ref, variant=args.variant)
    return 0


def cmd_models(args) -> int:
    cfg = _load(args)
    from corpus2model.tasks import registry
    from corpus2model.tasks.stage import StageError

    root, name = cfg.paths.registry, cfg.registry.model_name
    try:
        if args.action == "list":
            rows = registry.list_versions(root, name)
            if not rows:
                print(f"no versions of {name} in {root}")
            for r in rows:
                print(json.dumps(r, default=str))
        elif args.action == "promote":
            if not args.version:
                raise SystemExit("c2m models promote CONFIG VERSION")
            registry.promote(root, name, args.version)
            print(f"production -> {args.version}")
        elif args.action == "rollback":
            print(f"production -> {registry.rollback(root, name)}")
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_tune(args) -> int:
    """Optuna search over finetune settings; writes the best trial's config (flows/tune.py)."""
    cfg = _load(args)
    _project_env(cfg)
    from corpus2model.flows.tune import tune_flow
    from corpus2model.tasks.stage import StageError

    try:
        result = tune_flow()(config_path=str(args.config), overrides=_parse_set(args.set), trials=args.trials)
    except StageError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    b = result["best"]
    print(f"\nbest trial {b['trial']}: eval loss {b['eval_loss']:.4f} "
          f"(learning_rate {b['learning_rate']:.3g}, lora_r {b['lora_r']}, warmup_steps {b['warmup_steps']})")
    print(f"best config: {result['best_config']}   (train it: c2m run {result['best_config']})")
    return 0


def cmd_deploy(args) -> int:
    cfg = _load(args)
    _project_env(cfg)
    from corpus2model.flows.deploy import DeployError, deploy

    try:
        deploy(args.config, args.cron, name=args.name, serve=not args.no_serve)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_init(args) -> int:
    """Write a starter config (c2m.yaml) and the bundled sample corpus into DIR (flows/scaffold.py)."""
    from corpus2model.flows.scaffold import InitError, init

    try:
        made = init(args.dir, force=args.force)
    except InitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {made['config']} and the sample corpus ({made['files']} files) into {made['dir']}")
    print(f"next: cd {args.dir} && c2m status c2m.yaml && c2m run c2m.yaml")
    return 0


def cmd_server(args) -> int:
    """Start the Prefect server + UI on 127.0.0.1 with this project's PREFECT_HOME."""
    _project_env()
    import subprocess

    api = f"http://{args.host}:{args.port}/api"
    # The UI asks the server where its API is; without these it answers the default port 4200.
    env = {**os.environ, "PREFECT_SERVER_API_HOST": args.host, "PREFECT_SERVER_API_PORT": str(args.port),
           "PREFECT_UI_API_URL": api}
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another server
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", args.host, "--port", str(args.port)]
    print(f"Prefect UI: http://{args.host}:{args.port}  (then: export PREFECT_API_URL={api})")
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl+C reached the server too; SIGTERM (flows/interrupts.py) reached only us: pass it on and let
        # the server stop its own children, then make sure nothing of it is left.
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        from corpus2model.flows.interrupts import stop_descendants

        stop_descendants()
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="c2m", description="corpus2model: raw text corpus -> served model, one cached Prefect DAG")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", type=Path, help="YAML config, e.g. configs/demo.yaml")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. finetune.learning_rate=1e-4")
        return sp

    with_config(sub.add_parser("run", help="run the DAG; cached stages are skipped")).set_defaults(fn=cmd_run)
    with_config(sub.add_parser("status", help="show which stages would run and why, without running")).set_defaults(fn=cmd_status)
    sp = with_config(sub.add_parser("serve", help="serve the production model over HTTP on 127.0.0.1"))
    sp.add_argument("--host", default=None)
    sp.add_argument("--port", type=int, default=None)
    sp.add_argument("--ref", default="production", help="alias or version (v1, v2, ...)")
    sp.add_argument("--variant", default=None, help="tuned or dynamic_int8 (default: serve.variant, else the registered one)")
    sp.set_defaults(fn=cmd_serve)
    sp = sub.add_parser("models", help="list, promote or roll back registered model versions")
    sp.add_argument("action", choices=["list", "promote", "rollback"])
    with_config(sp)
    sp.add_argument("version", nargs="?")
    sp.set_defaults(fn=cmd_models)
    sp = with_config(sub.add_parser("tune", help="Optuna search over finetune settings; writes the best config"))
    sp.add_argument("--trials", type=int, default=None, help="number of trials (default: tune.trials)")
    sp.set_defaults(fn=cmd_tune)
    sp = with_config(sub.add_parser("deploy", help="schedule the DAG on the Prefect server (cron) and serve it"))
    sp.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    sp.add_argument("--name", default=None, help="deployment name (default: the config's name)")
    sp.add_argument("--no-serve", action="store_true", help="only register the deployment; do not run scheduled runs here")
    sp.set_defaults(fn=cmd_deploy)
    from corpus2model.flows.standalone import add_subcommands  # c2m ingest/clean/dedup IN OUT: one stage on a folder

    add_subcommands(sub)
    sp = sub.add_parser("init", help="write a starter config (c2m.yaml) and the sample corpus into a new folder")
    sp.add_argument("dir", type=Path, help="folder to create (must be empty unless --force)")
    sp.add_argument("--force", action="store_true", help="write into a non-empty folder (overwrites the files it writes)")
    sp.set_defaults(fn=cmd_init)
    sp = sub.add_parser("server", help="start the Prefect server and UI for this project")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=4200)
    sp.set_defaults(fn=cmd_server)
    return p


def main(argv: list[str] | None = None) -> int:
    from corpus2model.flows import interrupts

    args = build_parser().parse_args(argv)
    interrupts.install()  # SIGTERM takes the Ctrl+C path: children stopped, locks released, no orphans
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"\nc2m {args.command}: interrupted; finished stages stay cached, nothing half-written is kept "
              "(rerun the same command to continue)", file=sys.stderr)
        return interrupts.EXIT_SIGTERM if interrupts.stopping() else 130


if __name__ == "__main__":
    sys.exit(main())
