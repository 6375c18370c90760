// Validates a rendered Dropline overlay (a YAML stream on stdin) offline:
// every object against its schema (Kubernetes' own kinds and the Strimzi,
// KEDA and Prometheus Operator CRDs, from the kubernetes-models packages),
// then against the rules Dropline's deployment depends on. Prints one line
// per problem and exits 1 if there is any. scripts/k8s.sh check runs it.
//
//   node k8s/validate/validate.mjs [--production] < rendered.yaml
import { parseAllDocuments } from "yaml";

// API group -> the package whose models cover it. A group not here is an
// error, never a silent pass.
const PACKAGES = {
  "": "kubernetes-models",
  apps: "kubernetes-models",
  policy: "kubernetes-models",
  autoscaling: "kubernetes-models",
  "networking.k8s.io": "kubernetes-models",
  "kafka.strimzi.io": "@kubernetes-models/strimzi-kafka-operator",
  "keda.sh": "@kubernetes-models/keda",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

const production = process.argv.includes("--production");
const problems = [];
const problem = (object, text) => problems.push(`${object.kind}/${object.metadata?.name}: ${text}`);

async function model(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  const pkg = PACKAGES[group];
  if (pkg === undefined) return undefined;
  const path = group === "" ? `${pkg}/${version}/${kind}` : `${pkg}/${group}/${version}/${kind}`;
  try {
    return (await import(path))[kind];
  } catch {
    return undefined;
  }
}

async function checkSchemas(objects) {
  for (const object of objects) {
    const Model = await model(object.apiVersion ?? "", object.kind ?? "");
    if (Model === undefined) {
      problem(object, `no schema known for ${object.apiVersion} ${object.kind}`);
      continue;
    }
    try {
      new Model(object).validate();
    } catch (error) {
      problem(object, `does not match its schema: ${error.message}`);
    }
  }
}

const byKind = (objects, kind) => objects.filter((o) => o.kind === kind);
const selects = (selector, labels) =>
  Object.entries(selector?.matchLabels ?? {}).every(([k, v]) => labels?.[k] === v);

function checkRules(objects) {
  if (byKind(objects, "Secret").length > 0) {
    problems.push("Secret: secrets are referenced, never rendered (create the Secret from your secret store)");
  }
  const config = byKind(objects, "ConfigMap").find((c) => c.metadata.name.startsWith("dropline") && c.data?.DROPLINE_DRAIN_TIMEOUT_SECS);
  const drainSecs = Number(config?.data?.DROPLINE_DRAIN_TIMEOUT_SECS);
  if (!config) problems.push("ConfigMap/dropline: missing, or it has no DROPLINE_DRAIN_TIMEOUT_SECS");
  const pdbs = byKind(objects, "PodDisruptionBudget");

  for (const deployment of byKind(objects, "Deployment")) {
    const pod = deployment.spec.template.spec;
    const labels = deployment.spec.template.metadata?.labels;
    // The kubelet's SIGKILL comes this long after the preStop hook starts:
    // the hook's sleep and the drain must both fit.
    const preStop = Math.max(0, ...pod.containers.map((c) => c.lifecycle?.preStop?.sleep?.seconds ?? 0));
    if (!(pod.terminationGracePeriodSeconds > drainSecs + preStop)) {
      problem(deployment, `terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds} must exceed the preStop sleep and the drain timeout (${preStop} + ${drainSecs} s)`);
    }
    if (pod.securityContext?.runAsNonRoot !== true) problem(deployment, "the pod must run as non-root");
    if (!pdbs.some((p) => selects(p.spec.selector, labels))) problem(deployment, "no PodDisruptionBudget selects its pods");
    for (const c of pod.containers) {
      if (c.securityContext?.readOnlyRootFilesystem !== true) problem(deployment, `container ${c.name}: root filesystem must be read-only`);
      if (c.securityContext?.allowPrivilegeEscalation !== false) problem(deployment, `container ${c.name}: privilege escalation must be off`);
      if (c.readinessProbe?.httpGet?.path !== "/readyz") problem(deployment, `container ${c.name}: readiness must probe /readyz`);
      if (c.livenessProbe?.httpGet?.path !== "/healthz") problem(deployment, `container ${c.name}: liveness must probe /healthz`);
      if (!c.resources?.requests?.cpu || !c.resources?.requests?.memory || !c.resources?.limits?.memory) {
        problem(deployment, `container ${c.name}: needs CPU and memory requests and a memory limit`);
      }
      for (const env of c.env ?? []) {
        if (/SECRET|MYSQL_URL/.test(env.name) && env.valueFrom?.secretKeyRef === undefined) {
          problem(deployment, `container ${c.name}: ${env.name} must come from a Secret, not be inlined`);
        }
      }
    }
  }

  // Each stage's KEDA maximum is its topic's partition count: more
  // consumers than partitions would sit idle, fewer would cap the stage
  // below what its topic allows.
  const topics = new Map(byKind(objects, "KafkaTopic").map((t) => [t.spec.topicName ?? t.metadata.name, t]));
  for (const scaled of byKind(objects, "ScaledObject")) {
    const triggers = scaled.spec.triggers.filter((t) => t.type === "kafka");
    if (triggers.length === 0) problem(scaled, "no kafka trigger");
    for (const trigger of triggers) {
      const topic = topics.get(trigger.metadata.topic);
      if (topic === undefined) problem(scaled, `its trigger watches ${trigger.metadata.topic}, which no KafkaTopic declares`);
    }
    const first = topics.get(triggers[0]?.metadata.topic);
    if (first && scaled.spec.maxReplicaCount !== first.spec.partitions) {
      problem(scaled, `maxReplicaCount ${scaled.spec.maxReplicaCount} differs from the ${first.spec.partitions} partitions of ${first.spec.topicName}`);
    }
  }
  for (const topic of topics.values()) {
    const replicas = topic.spec.replicas;
    const minIsr = Number(topic.spec.config?.["min.insync.replicas"]);
    if (production && (replicas < 3 || minIsr < 2)) {
      problem(topic, `production topics need 3 replicas and min.insync.replicas 2 (has ${replicas} and ${minIsr})`);
    }
    if (replicas > 1 && !(minIsr < replicas)) problem(topic, "min.insync.replicas must leave one broker free to fail");
  }

  const policies = byKind(objects, "NetworkPolicy");
  const denyAll = policies.some(
    (p) => Object.keys(p.spec.podSelector ?? {}).length === 0 && (p.spec.policyTypes ?? []).includes("Ingress") && !p.spec.ingress,
  );
  if (!denyAll) problems.push("NetworkPolicy: no default deny of incoming traffic");
  for (const policy of policies) {
    const open = (policy.spec.ingress ?? []).some((rule) => !rule.from);
    const onlyIngress = policy.spec.podSelector?.matchLabels?.["app.kubernetes.io/component"] === "ingress";
    if (open && !onlyIngress) problem(policy, "lets anyone in to pods other than the ingress");
  }
  for (const kind of ["PodMonitor", "PrometheusRule", "HorizontalPodAutoscaler"]) {
    if (byKind(objects, kind).length === 0) problems.push(`${kind}: missing`);
  }
}

const input = await new Promise((resolve) => {
  let text = "";
  process.stdin.on("data", (chunk) => (text += chunk));
  process.stdin.on("end", () => resolve(text));
});
const documents = parseAllDocuments(input);
const objects = [];
for (const document of documents) {
  if (document.errors.length > 0) {
    problems.push(`YAML: ${document.errors[0].message}`);
    continue;
  }
  const object = document.toJS();
  if (object !== null) objects.push(object);
}
if (objects.length === 0) problems.push("no objects on stdin");
await checkSchemas(objects);
checkRules(objects);
for (const line of problems) console.log(line);
console.log(`${objects.length} objects, ${problems.length} problems`);
process.exit(problems.length > 0 ? 1 : 0);
