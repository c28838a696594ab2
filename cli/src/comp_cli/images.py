"""Local images for machines without a registry: a busybox image from the host's busybox."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import docker

DEFAULT_BUSYBOX_TAG = "comp/busybox:latest"
_INDEX_HTML = b"<html><body>COMP busybox</body></html>\n"


class ImageError(RuntimeError):
    pass


def find_static_busybox() -> Path:
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).exists():
            path = Path(candidate).resolve()
            ldd = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
            if "not a dynamic executable" in (ldd.stdout + ldd.stderr) or ldd.returncode != 0:
                return path
            raise ImageError(f"{path} is dynamically linked; install busybox-static (apt-get install busybox-static)")
    raise ImageError("no busybox on this host; install busybox-static (apt-get install busybox-static)")


def busybox_rootfs_tar(busybox: Path) -> bytes:
    """A root filesystem: /bin/busybox, a symlink per applet, /tmp, and a web root /www."""
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for directory, mode in (("bin", 0o755), ("tmp", 0o1777), ("www", 0o755), ("etc", 0o755)):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, now
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode, link.mtime = tarfile.SYMTYPE, "busybox", 0o777, now
            tar.addfile(link)
        for name, body in (("www/index.html", _INDEX_HTML), ("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(body), 0o644, now
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def import_busybox(tag: str = DEFAULT_BUSYBOX_TAG, client: docker.DockerClient | None = None) -> str:
    """Build (or rebuild) ``tag`` from the host's static busybox; returns the image id."""
    client = client or docker.from_env()
    repository, _, version = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
    data = busybox_rootfs_tar(find_static_busybox())
    client.api.import_image_from_data(
        data, repository=repository, tag=version or "latest", changes=["ENV PATH=/bin", 'CMD ["sh"]']
    )
    return client.images.get(tag).id
