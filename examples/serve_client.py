"""Score a pairs CSV through a running `oi-ray serve`, as a line machine would.

    oi-ray serve -e SPEC.yaml                      # in another terminal
    python examples/serve_client.py SPEC.yaml [--url http://127.0.0.1:8000] [--json] [--pairs-per-request 8]

Reads the spec's inference split (else test, else validation), asks the service which
lightings it takes (GET /v1/model), posts the pairs (multipart files, or JSON with base64
images) and prints each pair's distance and decision next to its CSV label. With a bearer
token, put it in $OI_RAY_SERVE_TOKEN. Only the standard library and `requests` are used:
a client needs nothing of oi-ray but the API.
"""

import argparse
import base64
import os
from pathlib import Path

import requests

from oi_ray.config import load_config
from oi_ray.data.pairs import first_configured_split, load_split

TIMEOUT_S = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="the spec whose pairs CSV to score")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (with its route prefix)")
    parser.add_argument("--json", action="store_true", help="send JSON with base64 images instead of files")
    parser.add_argument("--pairs-per-request", type=int, default=1)
    parser.add_argument("--limit", type=int, default=16, help="pairs to score")
    args = parser.parse_args()

    token = os.environ.get("OI_RAY_SERVE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    card = _answer(requests.get(f"{args.url}/v1/model", headers=headers, timeout=TIMEOUT_S))
    lights = card["card"]["lights"]
    print(f"{card['model']} ({card['backend']}), threshold {card['threshold']['value']:.4g}; "
          f"fields {card['fields']}")

    config = load_config(args.spec)
    split = first_configured_split(config.dataset, ("infer_dataset", "test_dataset", "validation_dataset"))
    table = load_split(config.dataset, split, require_labels=False)
    rows = list(range(min(args.limit, len(table))))
    for start in range(0, len(rows), args.pairs_per_request):
        chunk = rows[start:start + args.pairs_per_request]
        sides = [{"test": table.test_paths[row], "golden": table.golden_paths[row]} for row in chunk]
        if args.json:
            body = {"pairs": [{"id": str(row), **{side: _base64_images(paths, lights)
                                                  for side, paths in pair.items()}}
                              for row, pair in zip(chunk, sides, strict=True)]}
            response = requests.post(f"{args.url}/v1/inspect", json=body, headers=headers, timeout=TIMEOUT_S)
        else:
            prefix = len(chunk) > 1
            files = [(f"{i}.{field}" if prefix else field, content) for i, pair in enumerate(sides)
                     for field, content in _files(pair, lights)]
            ids = {f"{i}.id" if prefix else "id": str(row) for i, row in enumerate(chunk)}
            response = requests.post(f"{args.url}/v1/inspect", files=files, data=ids, headers=headers,
                                     timeout=TIMEOUT_S)
        for answer in _answer(response)["results"]:
            row = table.rows.iloc[int(answer["id"])]
            print(f"  {row['object_name']:<12} {answer['distance']:8.4f}  {answer['decision']:<8} "
                  f"(label {row.get('label', '-')})")


def _answer(response: requests.Response) -> dict:
    """The JSON body of a 200, or exit with the service's error message."""
    if response.status_code != 200:
        try:
            reason = response.json()["error"]["message"]
        except (ValueError, KeyError):
            reason = response.text.strip()
        raise SystemExit(f"HTTP {response.status_code} from {response.url}: {reason}")
    return response.json()


def _files(pair: dict[str, list[str]], lights: list[str]) -> list[tuple[str, tuple[str, bytes]]]:
    """Multipart file fields ``test.<Light>`` / ``golden.<Light>`` (``test`` / ``golden`` for
    a model of one image per side)."""
    return [(f"{side}.{light}" if light else side, (Path(path).name, Path(path).read_bytes()))
            for side, paths in pair.items() for light, path in zip(lights or [None], paths, strict=True)]


def _base64_images(paths: list[str], lights: list[str]) -> dict[str, str] | str:
    encoded = [base64.b64encode(Path(path).read_bytes()).decode() for path in paths]
    return dict(zip(lights, encoded, strict=True)) if lights else encoded[0]


if __name__ == "__main__":
    main()
