"""What KubeRay requires of the manifests in deploy/kuberay/, as a compact JSON Schema.

Written by hand from the ``v1`` schemas of KubeRay's CustomResourceDefinitions at the tag
``v1.7.0`` of github.com/ray-project/kuberay:

- ``ray-operator/config/crd/bases/ray.io_rayclusters.yaml`` (RayCluster)
- ``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` (RayJob; its ``rayClusterSpec`` is the
  RayCluster's spec)

and, marked where used, checks the operator makes before it acts on a resource
(``ray-operator/controllers/ray/utils/validation.go``). The CRDs are not copied here; this
states what the manifests touch. For each object modelled: its required fields, the names of
all its properties in that version (none of these objects keeps unknown fields: the API server
drops a misspelt field, or refuses it under kubectl's strict field validation, so it is refused
here), and the types and enums of the fields the manifests set. Properties the manifests do not
set are named with an empty schema. Maps the CRD leaves open (``rayStartParams``, resource lists,
labels) stay open here.

Moving to another KubeRay version: read those files at its tag and update what follows.
"""

from __future__ import annotations

from typing import Any

KUBERAY_VERSION = "1.7.0"
API_VERSION = "ray.io/v1"

Schema = dict[str, Any]


def _closed(properties: str, *, required: str = "", **typed: Schema) -> Schema:
    """An object with exactly these (space-separated) property names, the ``required`` ones
    among them; ``typed`` gives the schema of some."""
    names, must = properties.split(), required.split()
    unknown = (set(typed) | set(must)) - set(names)
    assert not unknown, f"not in the property list: {sorted(unknown)}"
    return {
        "type": "object",
        "properties": {name: typed.get(name, {}) for name in names},
        "required": must,
        "additionalProperties": False,
    }


def _array(items: Schema, **more: Any) -> Schema:
    return {"type": "array", "items": items, **more}


STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
BOOLEAN: Schema = {"type": "boolean"}
# The operator refuses negative replica counts, idle timeouts and TTLs (validation.go).
COUNT: Schema = {"type": "integer", "minimum": 0}
# A Kubernetes quantity ("500m", "12Gi", 1): the CRD's int-or-string with a pattern.
QUANTITY: Schema = {
    "type": ["integer", "string"],
    "pattern": r"^[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?(\d+(\.\d*)?|\.\d+))?$",
}
RESOURCE_LIST: Schema = {"type": "object", "additionalProperties": QUANTITY}
# rayStartParams is a map of strings: `num-cpus: 0` unquoted is refused.
RAY_START_PARAMS: Schema = {"type": "object", "additionalProperties": STRING}

_KEY_REF = _closed("key name optional", required="key", key=STRING, name=STRING)
ENV_VAR = _closed(
    "name value valueFrom",
    required="name",
    name=STRING,
    value=STRING,
    valueFrom=_closed(
        "configMapKeyRef fieldRef fileKeyRef resourceFieldRef secretKeyRef",
        configMapKeyRef=_KEY_REF,
        secretKeyRef=_KEY_REF,
    ),
)
CONTAINER_SECURITY = _closed(
    "allowPrivilegeEscalation appArmorProfile capabilities privileged procMount "
    "readOnlyRootFilesystem runAsGroup runAsNonRoot runAsUser seLinuxOptions seccompProfile "
    "windowsOptions",
    allowPrivilegeEscalation=BOOLEAN,
    capabilities=_closed("add drop", add=_array(STRING), drop=_array(STRING)),
    runAsGroup=INTEGER,
    runAsNonRoot=BOOLEAN,
    runAsUser=INTEGER,
)
CONTAINER = _closed(
    "args command env envFrom image imagePullPolicy lifecycle livenessProbe name ports "
    "readinessProbe resizePolicy resources restartPolicy restartPolicyRules securityContext "
    "startupProbe stdin stdinOnce terminationMessagePath terminationMessagePolicy tty "
    "volumeDevices volumeMounts workingDir",
    # Only the name: Kubernetes wants an image when it creates the pod, not in the template.
    required="name",
    name=STRING,
    image=STRING,
    env=_array(ENV_VAR),
    ports=_array(
        _closed(
            "containerPort hostIP hostPort name protocol",
            required="containerPort",
            containerPort=INTEGER,
            name=STRING,
        )
    ),
    resources=_closed("claims limits requests", limits=RESOURCE_LIST, requests=RESOURCE_LIST),
    securityContext=CONTAINER_SECURITY,
    volumeMounts=_array(
        _closed(
            "mountPath mountPropagation name readOnly recursiveReadOnly subPath subPathExpr",
            required="mountPath name",
            mountPath=STRING,
            name=STRING,
            readOnly=BOOLEAN,
        )
    ),
)
VOLUME = _closed(
    "awsElasticBlockStore azureDisk azureFile cephfs cinder configMap csi downwardAPI emptyDir "
    "ephemeral fc flexVolume flocker gcePersistentDisk gitRepo glusterfs hostPath image iscsi "
    "name nfs persistentVolumeClaim photonPersistentDisk portworxVolume projected quobyte rbd "
    "scaleIO secret storageos vsphereVolume",
    required="name",
    name=STRING,
    configMap=_closed("defaultMode items name optional", name=STRING),
    emptyDir=_closed("medium sizeLimit", medium=STRING),
    persistentVolumeClaim=_closed("claimName readOnly", required="claimName", claimName=STRING),
)
POD_SECURITY = _closed(
    "appArmorProfile fsGroup fsGroupChangePolicy runAsGroup runAsNonRoot runAsUser "
    "seLinuxChangePolicy seLinuxOptions seccompProfile supplementalGroups "
    "supplementalGroupsPolicy sysctls windowsOptions",
    fsGroup=INTEGER,
    runAsGroup=INTEGER,
    runAsNonRoot=BOOLEAN,
    runAsUser=INTEGER,
)
POD_SPEC = _closed(
    "activeDeadlineSeconds affinity automountServiceAccountToken containers dnsConfig dnsPolicy "
    "enableServiceLinks ephemeralContainers hostAliases hostIPC hostNetwork hostPID hostUsers "
    "hostname hostnameOverride imagePullSecrets initContainers nodeName nodeSelector os overhead "
    "preemptionPolicy priority priorityClassName readinessGates resourceClaims resources "
    "restartPolicy runtimeClassName schedulerName schedulingGates schedulingGroup "
    "securityContext serviceAccount serviceAccountName setHostnameAsFQDN shareProcessNamespace "
    "subdomain terminationGracePeriodSeconds tolerations topologySpreadConstraints volumes",
    required="containers",
    # The operator refuses a group without a container (validation.go).
    containers=_array(CONTAINER, minItems=1),
    restartPolicy=STRING,
    securityContext=POD_SECURITY,
    tolerations=_array(
        _closed("effect key operator tolerationSeconds value", effect=STRING, key=STRING, operator=STRING)
    ),
    volumes=_array(VOLUME),
)
POD_TEMPLATE = _closed("metadata spec", metadata={"type": "object"}, spec=POD_SPEC)

HEAD_GROUP = _closed(
    "enableIngress headService ingressOptions labels rayStartParams resources serviceType template",
    required="template",
    rayStartParams=RAY_START_PARAMS,
    serviceType=STRING,
    template=POD_TEMPLATE,
)
WORKER_GROUP = _closed(
    "groupName idleTimeoutSeconds labels maxReplicas minReplicas numOfHosts priority "
    "rayStartParams replicas resources scaleStrategy suspend template",
    required="groupName maxReplicas minReplicas template",
    groupName=STRING,
    maxReplicas=COUNT,
    minReplicas=COUNT,
    rayStartParams=RAY_START_PARAMS,
    template=POD_TEMPLATE,
)
RAY_CLUSTER_SPEC = _closed(
    "authOptions autoscalerOptions enableInTreeAutoscaling gcsFaultToleranceOptions headGroupSpec "
    "headServiceAnnotations historyServerOptions managedBy networkPolicy rayVersion suspend "
    "tlsOptions upgradeStrategy workerGroupSpecs",
    required="headGroupSpec",
    authOptions=_closed(
        "enableK8sTokenAuth mode secretName",
        enableK8sTokenAuth=BOOLEAN,
        mode={"enum": ["disabled", "token"]},
        secretName=STRING,
    ),
    autoscalerOptions=_closed(
        "args command env envFrom idleTimeoutSeconds image imagePullPolicy resources "
        "securityContext upscalingMode version volumeMounts",
        env=_array(ENV_VAR),
        idleTimeoutSeconds=COUNT,
        securityContext=CONTAINER_SECURITY,
        upscalingMode={"enum": ["Default", "Aggressive", "Conservative"]},
        version={"enum": ["v1", "v2"]},
    ),
    enableInTreeAutoscaling=BOOLEAN,
    headGroupSpec=HEAD_GROUP,
    rayVersion=STRING,
    workerGroupSpecs=_array(WORKER_GROUP),
)
RAY_JOB_SPEC = _closed(
    "activeDeadlineSeconds backoffLimit clusterSelector deletionStrategy entrypoint "
    "entrypointNumCpus entrypointNumGpus entrypointResources jobId managedBy metadata "
    "preRunningDeadlineSeconds rayClusterSpec runtimeEnvYAML shutdownAfterJobFinishes "
    "submissionMode submitterConfig submitterPodTemplate suspend ttlSecondsAfterFinished",
    entrypoint=STRING,
    rayClusterSpec=RAY_CLUSTER_SPEC,
    runtimeEnvYAML=STRING,
    shutdownAfterJobFinishes=BOOLEAN,
    submissionMode=STRING,
    submitterPodTemplate=POD_TEMPLATE,
    ttlSecondsAfterFinished=COUNT,
)


def _resource(kind: str, spec: Schema, *, max_name: int) -> Schema:
    # The operator's check of the name (validation.go): a DNS-1035 label, short enough for the
    # names it derives from it (pods, the head Service; a RayJob's cluster adds a suffix).
    name = {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": max_name}
    return _closed(
        "apiVersion kind metadata spec status",
        # Not required by the CRD's schema: Kubernetes wants an apiVersion, a kind and a name of
        # every object, and without a spec a manifest describes no cluster or job.
        required="apiVersion kind metadata spec",
        apiVersion={"const": API_VERSION},
        kind={"const": kind},
        metadata={"type": "object", "required": ["name"], "properties": {"name": name}},
        spec=spec,
    )


SCHEMAS = {
    "RayCluster": _resource("RayCluster", RAY_CLUSTER_SPEC, max_name=53),
    "RayJob": _resource("RayJob", RAY_JOB_SPEC, max_name=47),
}
