# hevisum, CPU image: the package, JupyterLab and the "Python (.venv) hevisum" kernel.
# Installed with the Makefile's own recipes (make torch, make init), started with scripts/lab.sh:
# a token is always required and the server listens on 127.0.0.1 unless LAB_IP says otherwise.
# Build:  docker build -t hevisum:cpu .
# Run:    docker run --rm -it --init -p 127.0.0.1:8888:8888 -e LAB_IP=0.0.0.0 hevisum:cpu
# (details, data mounts and GPU use: docs/docker.md)
FROM python:3.11-slim

# make: the image runs the same set-up recipes as a workstation does.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*

# An unprivileged user owns the venv and the workspace; nothing below runs as root.
ARG UID=1000
ARG GID=1000
RUN groupadd --gid "${GID}" hevisum \
 && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash hevisum \
 && mkdir -p /opt/venv /workspace \
 && chown hevisum:hevisum /opt/venv /workspace

# The venv lives outside /workspace so that mounting a checkout over /workspace does not hide it.
ENV VENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

USER hevisum
WORKDIR /workspace

# Torch first, in its own layer, so a code change does not download it again. The version is the
# Makefile's TORCH_SPEC; the CPU wheel index keeps the CUDA libraries out of the image (a CUDA
# build: --build-arg TORCH_INDEX=<PyTorch CUDA wheel index>, see docs/docker.md).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY --chown=hevisum:hevisum Makefile pyproject.toml ./
RUN make torch VENV=/opt/venv TORCH_PIP_ARGS="--index-url ${TORCH_INDEX}"

# The package (editable, so a checkout mounted at /workspace is what the kernel imports), JupyterLab
# and the Jupyter kernel, exactly as `make init` does it outside Docker.
COPY --chown=hevisum:hevisum . .
RUN make init VENV=/opt/venv TORCH_PIP_ARGS="--index-url ${TORCH_INDEX}"

# 127.0.0.1 inside a container is reachable only from inside it: run with -e LAB_IP=0.0.0.0 and publish
# the port on the host's loopback only (-p 127.0.0.1:8888:8888). The token comes from JUPYTER_TOKEN
# (docker run -e JUPYTER_TOKEN=...) or is generated and printed in the container's log.
ENV LAB_IP=127.0.0.1 \
    LAB_PORT=8888 \
    LAB_ROOT=/workspace \
    LAB_PYTHON=/opt/venv/bin/python
# The launcher also lives outside /workspace, so it is there whatever is mounted over /workspace.
COPY scripts/lab.sh /usr/local/bin/hevisum-lab
EXPOSE 8888
CMD ["bash", "/usr/local/bin/hevisum-lab"]
