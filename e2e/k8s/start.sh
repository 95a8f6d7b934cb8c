#!/usr/bin/env bash
# Start etcd + kube-apiserver (+ kube-controller-manager unless K8S_NO_KCM=1) on 127.0.0.1.
# Writes $K8S_STATE/kubeconfig and *.pid; stop with stop.sh. Needs build.sh first.
set -euo pipefail
BIN=${K8S_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/kvtier/k8s}/bin
D=${K8S_STATE:-/tmp/kvtier-k8s}; PORT=${K8S_PORT:-6443}; EPORT=${K8S_ETCD_PORT:-2379}
rm -rf "$D"; mkdir -p "$D/pki"; cd "$D/pki"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj /CN=test-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 30 -extfile ext.cnf 2>/dev/null
openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n'); echo "$TOKEN,admin,admin,system:masters" > tokens.csv
cd "$D"
etcd --data-dir "$D/etcd" --listen-client-urls "http://127.0.0.1:$EPORT" --advertise-client-urls "http://127.0.0.1:$EPORT" \
  --listen-peer-urls "http://127.0.0.1:$((EPORT+1))" --initial-advertise-peer-urls "http://127.0.0.1:$((EPORT+1))" \
  --initial-cluster "default=http://127.0.0.1:$((EPORT+1))" --unsafe-no-fsync >"$D/etcd.log" 2>&1 &
echo $! > "$D/etcd.pid"
# The API server's command line is kept in a script so restart-apiserver.sh can rerun it.
cat > "$D/run-apiserver.sh" <<RUN
#!/usr/bin/env bash
cd "$D"
exec "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$EPORT" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \\
  --secure-port="$PORT" --insecure-port=0 --tls-cert-file=pki/apiserver.crt --tls-private-key-file=pki/apiserver.key \\
  --client-ca-file=pki/ca.crt --token-auth-file=pki/tokens.csv --authorization-mode=RBAC \\
  --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=pki/sa.pub \\
  --service-account-signing-key-file=pki/sa.key --service-cluster-ip-range=10.96.0.0/24 >>"$D/apiserver.log" 2>&1
RUN
chmod +x "$D/run-apiserver.sh"
"$D/run-apiserver.sh" &
echo $! > "$D/apiserver.pid"
cat > "$D/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:$PORT", certificate-authority-data: $(base64 -w0 pki/ca.crt)}}]
users: [{name: admin, user: {token: $TOKEN}}]
contexts: [{name: local, context: {cluster: local, user: admin, namespace: default}}]
current-context: local
KC
for i in $(seq 1 120); do
  kubectl --kubeconfig "$D/kubeconfig" get --raw /readyz >/dev/null 2>&1 && break
  [ "$i" = 120 ] && { echo "apiserver not ready"; tail -30 "$D/apiserver.log"; exit 1; }; sleep 0.5
done
if [ "${K8S_NO_KCM:-0}" != 1 ]; then   # garbage collection, namespace deletion, Deployment->ReplicaSet->Pod, default ServiceAccounts
  "$BIN/kube-controller-manager" --kubeconfig="$D/kubeconfig" --authentication-kubeconfig="$D/kubeconfig" \
    --authorization-kubeconfig="$D/kubeconfig" --bind-address=127.0.0.1 --secure-port=0 --port=0 --leader-elect=false \
    --service-account-private-key-file=pki/sa.key --root-ca-file=pki/ca.crt \
    --controllers='*,-nodeipam,-nodelifecycle,-ttl,-bootstrapsigner,-tokencleaner,-cloud-node-lifecycle,-route,-service' \
    >"$D/kcm.log" 2>&1 &
  echo $! > "$D/kcm.pid"
  for i in $(seq 1 60); do kubectl --kubeconfig "$D/kubeconfig" -n default get sa default >/dev/null 2>&1 && break; sleep 0.5; done
fi
echo "k8s ready: export KUBECONFIG=$D/kubeconfig"
