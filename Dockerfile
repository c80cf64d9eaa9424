# payment-worker image: build with cargo, run the single static-enough binary on distroless.
#
#   docker build -t payment-worker:0.1.0 .
#
# The binary carries its default topology profile and Mozilla's root certificates (webpki),
# so the runtime image needs nothing but glibc.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin payment-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/payment-worker /usr/local/bin/payment-worker
COPY topology/default.toml /usr/share/payment-worker/topology/default.toml
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/payment-worker"]
CMD ["run"]
