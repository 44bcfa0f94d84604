"""The serving dependencies declared in pyproject.toml, with ONNX Runtime's build chosen by the image.

Printed one a line for `pip install -c constraints.txt -r -`, so an image installs what the
project declares, at the versions of the lock, and nothing that training or development needs.
Usage: python3 requirements.py onnxruntime|onnxruntime-gpu < pyproject.toml
"""

import re
import sys
import tomllib

runtime = sys.argv[1]
wanted = []
for dep in tomllib.load(sys.stdin.buffer)["project"]["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
    if name.startswith("onnxruntime"):  # one line per platform marker: the image has one platform
        dep = runtime + dep[len(name) :].split(";")[0].strip()
    if dep not in wanted:
        wanted.append(dep)
print("\n".join(wanted))
