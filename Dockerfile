# gpt2 serve on one NVIDIA GPU. Built and run elsewhere (this project's machines have no Docker
# engine); everything it installs comes from Ubuntu's packages and PyPI. See docs/serving.md, "Docker".
#
#   docker build -t gpt2-serve .
#   docker run --gpus all -p 8000:8000 -v $PWD/runs/gpt2-124M:/models -e GPT2_API_KEY=... gpt2-serve \
#       --model /models --served-model-name gpt2
#
# The base only provides CUDA's user-space pieces a container needs next to the host's driver: the
# PyTorch wheel brings its own CUDA libraries.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# gcc and the Python headers: Triton compiles a small launcher for the fused decode kernels at start-up.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# PyTorch first, in its own layer: PyPI's Linux wheel is the CUDA build (with triton).
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpt2 ./gpt2
RUN pip install ".[serve]" && rm -rf /src

# Not root; its home holds Triton's kernel cache.
RUN useradd --create-home --uid 1000 gpt2
USER gpt2
WORKDIR /home/gpt2

EXPOSE 8000
# 503 while the model loads and the graphs are captured (the start period covers it), and whenever the
# engine has died or is wedged; urlopen raises on anything but 2xx.
HEALTHCHECK --start-period=300s --interval=15s --timeout=5s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

ENTRYPOINT ["gpt2", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/models"]
