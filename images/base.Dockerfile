# Production base image: an official CUDA PyTorch image plus images/install.sh, the same install
# step the offline base (images/build_offline_base.sh) runs, so the two cannot drift.
#
#   docker build -f images/base.Dockerfile -t autoresearch/base:cuda images/
#   (or: autoresearch images build --cuda, which tags it by the hash of its inputs)
#
# torch stays exactly as the image ships it (TORCH_SPEC=keep). The runtime flavour has no C
# compiler, which Triton needs for torch.compile on GPU, so install.sh adds gcc (INSTALL_CC=1).
# Pick another tag with --build-arg CUDA_IMAGE=...; it needs network and a registry to build.
ARG CUDA_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${CUDA_IMAGE}

COPY install.sh /tmp/install.sh
RUN TORCH_SPEC=keep INSTALL_CC=1 sh /tmp/install.sh python && rm /tmp/install.sh

ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
LABEL autoresearch.base.kind=cuda autoresearch.base.torch=keep
WORKDIR /app
