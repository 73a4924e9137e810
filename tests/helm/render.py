"""Helm's own engine (PyPI helm-python-sdk: Helm's Go SDK as a library) for the tests:

    render.py render CHART VALUES_JSON NAMESPACE   -> the rendered manifests, one YAML stream
    render.py lint CHART VALUES_JSON NAMESPACE     -> the lint report as JSON (strict)

Run by tests/src/render.rs in the venv tests/helm/venv.sh makes.
"""
import json
import sys

import helm_python


def main():
    verb, chart = sys.argv[1], sys.argv[2]
    values = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    if verb == "render":
        rendered = helm_python.Chart.load(chart).render(
            values, name="sluice", namespace=sys.argv[4], is_install=True
        )
        # Templates in a stable order; NOTES.txt is not an object.
        for path in sorted(rendered):
            if path.endswith("NOTES.txt") or not rendered[path].strip():
                continue
            print("---")
            print(f"# Source: {path}")
            print(rendered[path])
    elif verb == "lint":
        print(json.dumps(helm_python.lint(chart, values, strict=True, namespace=sys.argv[4])))
    else:
        sys.exit(f"unknown verb {verb}")


main()
