#!/usr/bin/env bash
# Fetch a Beam Flink job server from Maven Central into a cache folder OUTSIDE the repo and print
# the path of its jar (for --flink_job_server_jar). Idempotent: what is in the cache is reused.
#
#   bash scripts/fetch_flink_jar.sh        # -> ~/.cache/arkbatch-beam/flink/beam-runners-flink-F-job-server-V.jar
#   ARKBATCH_CACHE=/some/dir bash scripts/fetch_flink_jar.sh
#
# The Flink version to run with is in the printed file name (beam-runners-flink-<F>-job-server-...):
# pass it as --flink_version=<F>.
#
# 1. Wanted: the prebuilt job server matching the installed Beam,
#    org.apache.beam:beam-runners-flink-<F>-job-server:<beam version>, with F the newest Flink
#    Beam publishes one for (FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS[-1]), via
#    `mvn dependency:copy`. (Override with BEAM_VERSION / FLINK_VERSION.)
# 2. When Maven Central does not serve that artifact, a job server is assembled from Maven Central
#    instead: the runner org.apache.beam:beam-runners-flink-<F2>:<V2> (ARKBATCH_FLINK_FALLBACK,
#    default 1.19:2.62.0) and its runtime dependencies (`mvn dependency:copy-dependencies`) in
#    a lib/ folder, plus a small launcher jar whose manifest names FlinkJobServerDriver and that
#    class path, so `java -jar` (what Beam runs) starts the same server the prebuilt jar holds.
#    That Java runner is older than the Python SDK: fine for these tests, not for production.
#    (The newer beam-runners-flink-1.19:2.70.0 is on Maven Central here too, but its dependency
#    beam-runners-java-job-service:2.70.0 is not, so 2.62.0 is the newest that can be assembled.)
#
# Exit status: 0 with the path printed; 3 when java or mvn is missing (nothing printed);
# 1 when Maven Central had neither.
set -euo pipefail
PY=${PYTHON:-python3}
if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
  echo "fetch_flink_jar: java or mvn not found; cannot fetch the Flink job server" >&2
  exit 3
fi
MVN=(mvn -B -q)
PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
DEST="${ARKBATCH_CACHE:-$HOME/.cache/arkbatch-beam}/flink"
BEAM_VERSION=${BEAM_VERSION:-$("$PY" -c 'import apache_beam; print(apache_beam.__version__)')}
FLINK_VERSION=${FLINK_VERSION:-$("$PY" -c \
  'from apache_beam.options.pipeline_options import FlinkRunnerOptions as F; print(F.PUBLISHED_FLINK_VERSIONS[-1])')}
FALLBACK=${ARKBATCH_FLINK_FALLBACK:-1.19:2.62.0}
FB_FLINK=${FALLBACK%%:*}
FB_BEAM=${FALLBACK##*:}

NAME="beam-runners-flink-${FLINK_VERSION}-job-server-${BEAM_VERSION}"
JAR="$DEST/$NAME.jar"
FB_NAME="beam-runners-flink-${FB_FLINK}-job-server-${FB_BEAM}"
FB_DIR="$DEST/$FB_NAME"
FB_JAR="$FB_DIR/$FB_NAME.jar"

for have in "$JAR" "$FB_JAR"; do
  if [ -s "$have" ]; then
    echo "$have"
    exit 0
  fi
done

mkdir -p "$DEST"
TMP=$(mktemp -d "$DEST/.fetch-XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# 1. The prebuilt job server for this Beam version.
if "${MVN[@]}" "$PLUGIN:copy" \
    -Dartifact="org.apache.beam:beam-runners-flink-${FLINK_VERSION}-job-server:${BEAM_VERSION}:jar" \
    -DoutputDirectory="$TMP" >"$TMP/mvn.log" 2>&1; then
  mv -f "$TMP/$NAME.jar" "$JAR"
  echo "$JAR"
  exit 0
fi
echo "fetch_flink_jar: org.apache.beam:beam-runners-flink-${FLINK_VERSION}-job-server:${BEAM_VERSION}" \
  "is not on Maven Central here; assembling ${FB_NAME} from beam-runners-flink-${FB_FLINK}:${FB_BEAM}" >&2

# 2. Assemble one: the runner and its runtime dependencies, and a launcher jar.
cat >"$TMP/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.arkbatch</groupId><artifactId>flink-job-server</artifactId><version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.beam</groupId><artifactId>beam-runners-flink-${FB_FLINK}</artifactId>
      <version>${FB_BEAM}</version>
    </dependency>
  </dependencies>
</project>
EOF
if ! "${MVN[@]}" -f "$TMP/pom.xml" "$PLUGIN:copy-dependencies" -DincludeScope=runtime \
    -DoutputDirectory="$TMP/job/lib" >>"$TMP/mvn.log" 2>&1; then
  cat "$TMP/mvn.log" >&2
  echo "fetch_flink_jar: could not get a Flink job server from Maven Central" >&2
  exit 1
fi
"$PY" - "$TMP/job" "$FB_NAME.jar" <<'EOF'
import os, sys, zipfile
root, name = sys.argv[1], sys.argv[2]
libs = sorted(f"lib/{n}" for n in os.listdir(os.path.join(root, "lib")) if n.endswith(".jar"))
def wrap(line):  # manifest lines are at most 72 bytes; continuations start with a space
    out, line = [line[:72]], line[72:]
    while line:
        out.append(" " + line[:71])
        line = line[71:]
    return "\r\n".join(out)
manifest = "\r\n".join([
    "Manifest-Version: 1.0",
    "Main-Class: org.apache.beam.runners.flink.FlinkJobServerDriver",
    wrap("Class-Path: " + " ".join(libs)),
    "", "",
])
with zipfile.ZipFile(os.path.join(root, name), "w") as z:
    z.writestr("META-INF/MANIFEST.MF", manifest)
EOF
rm -rf "$FB_DIR"
mv "$TMP/job" "$FB_DIR"
echo "$FB_JAR"
