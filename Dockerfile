# raypipe on the official Ray image, for KubeRay (deploy/k8s/) and any container platform.
#   docker build -t raypipe:0.1.0 .                                              # CPU
#   docker build --build-arg RAY_TAG=2.60.0-py311-cu128 -t raypipe:0.1.0-cu128 .  # CUDA (GPU nodes)
# The package is installed as the README installs it (`make install`: a venv with the pinned torch, then the
# project); that venv comes first on PATH, so `ray start` (KubeRay, cluster.yaml) runs raypipe's Python.
# No credentials in the image: object-store keys come from the pod's service account or the standard AWS
# variables at run time.
ARG RAY_TAG=2.60.0-py311-cpu
FROM rayproject/ray:${RAY_TAG}

USER 0
# (uid 1000 / gid 100 are the image's `ray` user and `users` group)
# hadolint ignore=DL3008
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

USER 1000
WORKDIR /home/ray/raypipe
COPY --chown=1000:100 pyproject.toml constraints.txt Makefile README.md LICENSE ./
COPY --chown=1000:100 raypipe ./raypipe
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 serve ./serve
RUN make install PYTHON=python3 && rm -rf /home/ray/.cache/pip

ENV PATH=/home/ray/raypipe/.venv/bin:${PATH} \
    OMP_NUM_THREADS=1
EXPOSE 8000 8265 6379
