#!/usr/bin/env python3
"""Read user-data the way cloud-init does, for tests/provisioning.rs.

cloud-init parses MIME multi-part user-data with Python's email package and cloud-config
with PyYAML (python3-yaml, a dependency of Debian's cloud-init): the same parsers here, so
the test sees the parts and files cloud-init would.

  userdata.py parts FILE DIR         each part to DIR/part-N; prints "N<TAB>content-type"
  userdata.py write-files FILE ROOT  a cloud-config's write_files under ROOT; prints paths
  userdata.py nodeconfig FILE        each YAML document: "apiVersion<TAB>kind<TAB>clusterDNS"
"""
import email
import os
import sys

import yaml


def parts(path, out):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith(("MIME-Version:", "Content-Type: multipart")):
        found = [("text/cloud-config", text)]
    else:
        msg = email.message_from_string(text)
        if not msg.is_multipart():
            sys.exit(f"{path}: MIME but not multi-part")
        found = [
            (p.get_content_type(), p.get_payload(decode=True).decode("utf-8"))
            for p in msg.walk()
            if not p.is_multipart()
        ]
    os.makedirs(out, exist_ok=True)
    for n, (ctype, payload) in enumerate(found):
        with open(os.path.join(out, f"part-{n}"), "w", encoding="utf-8") as f:
            f.write(payload)
        print(f"{n}\t{ctype}")


def write_files(path, root):
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    for entry in config.get("write_files", []):
        dest = os.path.join(root, entry["path"].lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "w", encoding="utf-8") as f:
            f.write(entry.get("content", ""))
        os.chmod(dest, int(str(entry.get("permissions", "0644")), 8))
        print(entry["path"])


def nodeconfig(path):
    with open(path, encoding="utf-8") as f:
        for doc in yaml.safe_load_all(f):
            if doc is None:
                continue
            dns = doc.get("spec", {}).get("kubelet", {}).get("config", {}).get("clusterDNS", [])
            print(f"{doc.get('apiVersion')}\t{doc.get('kind')}\t{','.join(dns)}")


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["parts", path, out]:
            parts(path, out)
        case ["write-files", path, root]:
            write_files(path, root)
        case ["nodeconfig", path]:
            nodeconfig(path)
        case _:
            sys.exit(__doc__)
