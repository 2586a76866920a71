# The build stage makes the wheel from the build context (the repository less .dockerignore), so
# the image holds exactly what pyproject.toml packages: no second list of packages to forget one
# in. tests/test_compose.py builds the wheel from the same file set.
FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels && useradd --system credit-engine
USER credit-engine
WORKDIR /app
ENTRYPOINT ["credit-engine"]
