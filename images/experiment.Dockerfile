# One experiment: the base image plus the candidate's train.py, one thin layer. Built by
# runner/sandbox/images.py from an in-memory context (this file and train.py only), with
# networking off; it has no RUN step, so the candidate's code never runs at build time.
# prepare.py is not copied: it is bind-mounted read-only at /app/prepare.py at run time.
ARG BASE
FROM ${BASE}
COPY train.py /app/train.py
USER 10001:10001
WORKDIR /out
