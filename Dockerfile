# CPU image of morphserve. Build: docker build -t morphserve .
# Run:   docker run --rm -p 50051:50051 -p 9464:9464 -v $PWD/models:/models morphserve \
#          serve --model /models/SmolLM2-135M-Instruct.Q4_1.gguf
# Kubernetes manifests: deploy/.
FROM debian:bookworm AS build
WORKDIR /src
COPY scripts/install_deps.sh scripts/
RUN scripts/install_deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cmake --preset cpu -DMORPHSERVE_BUILD_TESTS=OFF -DMORPHSERVE_BUILD_BENCHMARKS=OFF \
    && cmake --build build -j "$(nproc)"

FROM debian:bookworm-slim
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
      libgrpc++1.51 libprotobuf32 libspdlog1.10 libabsl20220623 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/bin/morphserve /usr/local/bin/morphserve
USER 65532:65532
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/morphserve"]
