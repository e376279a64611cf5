"""Endpoint tools: package, serve locally, deploy to SageMaker, list and delete endpoints.

    python -m training.serving package --adapter workspace/runs/r1/adapter --base llava-hf/llava-1.5-7b-hf --out model.tar.gz
    python -m training.serving serve --model-dir model.tar.gz --port 8080
    python -m training.serving deploy --model model.tar.gz --name chartqa-r1 --role ARN --bucket BUCKET
    python -m training.serving endpoints
    python -m training.serving delete chartqa-r1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="workspace", help="studio workspace (holds endpoints.json)")
    parser.add_argument("--endpoint-url", default=None, help="AWS endpoint override (e.g. a moto server)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("package", help="write model.tar.gz for an adapter")
    p.add_argument("--adapter", required=True)
    p.add_argument("--base", required=True, help="base model id the endpoint loads, e.g. llava-hf/llava-1.5-7b-hf")
    p.add_argument("--out", default="model.tar.gz")
    p.add_argument("--quantize", default="auto", choices=("auto", "4bit", "none"))

    p = sub.add_parser("serve", help="run the endpoint handler on this machine (SageMaker-compatible HTTP)")
    p.add_argument("--model-dir", required=True, help="unpacked model folder or a model.tar.gz")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--verbose", action="store_true")

    p = sub.add_parser("deploy", help="upload model.tar.gz and create a SageMaker endpoint (costs money)")
    p.add_argument("--model", required=True, help="model.tar.gz from `package`")
    p.add_argument("--name", required=True)
    p.add_argument("--role", required=True, help="SageMaker execution role ARN")
    p.add_argument("--bucket", required=True)
    p.add_argument("--instance-type", default="ml.g5.2xlarge")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--target", default="hf-toolkit", choices=("hf-toolkit", "byoc"),
                   help="hf-toolkit: Hugging Face inference DLC, whole answers; byoc: the studio's own server "
                        "image (training/serving/Dockerfile, needs --image), whole answers and streaming")
    p.add_argument("--image", default=None, help="inference image URI ({region} is filled in)")
    p.add_argument("--region", default=None)
    p.add_argument("--wait", action="store_true", help="wait until InService")
    p.add_argument("--yes", action="store_true", help="do not ask before starting a paid endpoint")

    p = sub.add_parser("endpoints", help="list recorded endpoints with hours running and cost so far")
    p.add_argument("--no-refresh", action="store_true", help="do not ask SageMaker for live status")

    p = sub.add_parser("delete", help="delete an endpoint, its config and model")
    p.add_argument("name")

    args = parser.parse_args(argv)
    from training.serving import package as pkg

    if args.command == "package":
        print(pkg.package(args.adapter, args.base, args.out, args.quantize))
    elif args.command == "serve":
        from training.serving.server import load_server
        model_dir = Path(args.model_dir)
        if model_dir.is_file():
            model_dir = pkg.unpack(model_dir, tempfile.mkdtemp(prefix="model-"))
        server = load_server(model_dir, args.host, args.port, verbose=args.verbose)
        print(f"serving {model_dir} at {server.url} (GET /ping, POST /invocations, /endpoints/NAME/invocations"
              f"[-response-stream], /v1/chat/completions); Ctrl-C stops", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    elif args.command == "deploy":
        from training.prices import describe_cost
        print(describe_cost(args.instance_type, args.count))
        if not args.yes and input("Create this endpoint? It bills until deleted. [y/N] ").strip().lower() != "y":
            print("not deployed")
            return 1
        try:
            record = pkg.deploy(args.model, args.name, args.role, args.bucket, args.workspace, args.instance_type,
                                args.count, args.image, args.region, wait=args.wait, endpoint_url=args.endpoint_url,
                                target=args.target)
        except ValueError as e:           # a bad name, a byoc target without --image: before anything is created
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"endpoint {record['name']} created ({record['target']}, wire {record['wire']}, "
              f"{'streams' if record['streams'] else 'no streaming'}); "
              f"delete it with: python -m training.serving delete {record['name']}")
    elif args.command == "endpoints":
        rows = pkg.list_endpoints(args.workspace, refresh=not args.no_refresh, endpoint_url=args.endpoint_url)
        if not rows:
            print("no endpoints recorded")
        for r in rows:
            cost = "unknown price" if r["cost_usd"] is None else f"${r['cost_usd']:.2f} so far"
            print(f"{r['name']:<32} {r.get('status', '-'):<12} {r['count']} x {r['instance_type']:<16} "
                  f"{r['hours']:>8.1f} h  {cost}")
    elif args.command == "delete":
        pkg.delete(args.name, args.workspace, endpoint_url=args.endpoint_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
