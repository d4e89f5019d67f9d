#!/bin/sh
# tabby-install-cni: what Calico's install-cni does, for tabby-cni. Run by the DaemonSet
# (deploy/tabby.yaml) with the host's /opt/cni/bin and /etc/cni/net.d mounted under /host.
#
#   tabby-install-cni                 install the binary, the kubeconfig and the conflist; exit
#   tabby-install-cni --watch-token   rewrite the kubeconfig whenever kubelet rotates the token
#
# kubelet runs tabby-cni on the host, outside any pod: it has neither the pod's service account
# nor a route to the ClusterIP once kube-proxy is gone. So the kubeconfig it uses carries this
# pod's token and CA inline and the API server address of the kubernetes-services-endpoint
# ConfigMap (KUBERNETES_SERVICE_HOST/PORT). Every file is replaced atomically (write, rename):
# kubelet may run the plugin or read the directory at any moment.
# Paths are overridable for tests (tests/unit/test_deploy.py runs this script).
set -eu

CNI_BIN_DIR=${CNI_BIN_DIR:-/host/opt/cni/bin}
CNI_NET_DIR=${CNI_NET_DIR:-/host/etc/cni/net.d}
HOST_CNI_NET_DIR=${HOST_CNI_NET_DIR:-/etc/cni/net.d}  # CNI_NET_DIR as the host sees it
CNI_CONF_NAME=${CNI_CONF_NAME:-10-tabby.conflist}
KUBECONFIG_NAME=${KUBECONFIG_NAME:-tabby-kubeconfig}
TABBY_CNI_BINARY=${TABBY_CNI_BINARY:-/opt/tabby/cni/tabby-cni}
SERVICE_ACCOUNT_DIR=${SERVICE_ACCOUNT_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
TOKEN_CHECK_S=${TOKEN_CHECK_S:-60}

say() { echo "tabby-install-cni: $*" >&2; }

# install SRC DST MODE: copy beside DST, then rename over it.
install_file() {
	cp "$1" "$2.tabby-tmp"
	chmod "$3" "$2.tabby-tmp"
	mv -f "$2.tabby-tmp" "$2"
}

# Sets changed=1 when the file was (re)written, 0 when it was already current.
write_kubeconfig() {
	host=${KUBERNETES_SERVICE_HOST:?KUBERNETES_SERVICE_HOST is unset (no API server address)}
	port=${KUBERNETES_SERVICE_PORT:?KUBERNETES_SERVICE_PORT is unset}
	case $host in
	*'<'*) say "KUBERNETES_SERVICE_HOST is still the placeholder: edit the kubernetes-services-endpoint ConfigMap"; exit 1 ;;
	*:*) host="[$host]" ;; # IPv6
	esac
	ca=$(base64 -w0 <"$SERVICE_ACCOUNT_DIR/ca.crt")
	token=$(cat "$SERVICE_ACCOUNT_DIR/token")
	tmp=$(mktemp "$CNI_NET_DIR/.tabby-kubeconfig.XXXXXX") # mode 0600: it holds a token
	cat >"$tmp" <<EOF
# Written by tabby-install-cni (tabby-node DaemonSet) for tabby-cni; rewritten on token rotation.
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$host:$port
    certificate-authority-data: $ca
users:
- name: tabby-cni
  user:
    token: $token
contexts:
- name: tabby-cni
  context:
    cluster: local
    user: tabby-cni
current-context: tabby-cni
EOF
	if cmp -s "$tmp" "$CNI_NET_DIR/$KUBECONFIG_NAME"; then
		rm -f "$tmp"
		changed=0
	else
		mv -f "$tmp" "$CNI_NET_DIR/$KUBECONFIG_NAME"
		changed=1
	fi
}

write_conflist() {
	node=${NODE_NAME:?NODE_NAME is unset (downward API: spec.nodeName)}
	config=${TABBY_CNI_NETWORK_CONFIG:?TABBY_CNI_NETWORK_CONFIG is unset (tabby-config cni_network_config)}
	tmp=$(mktemp "$CNI_NET_DIR/.tabby-conflist.XXXXXX")
	printf '%s\n' "$config" |
		sed -e "s|__NODENAME__|$node|g" -e "s|__KUBECONFIG__|$HOST_CNI_NET_DIR/$KUBECONFIG_NAME|g" >"$tmp"
	chmod 644 "$tmp"
	mv -f "$tmp" "$CNI_NET_DIR/$CNI_CONF_NAME"
}

case ${1:-} in
"")
	mkdir -p "$CNI_BIN_DIR" "$CNI_NET_DIR"
	install_file "$TABBY_CNI_BINARY" "$CNI_BIN_DIR/tabby-cni" 755
	write_kubeconfig
	write_conflist # last: kubelet sees the network ready only once the rest is in place
	say "installed $CNI_BIN_DIR/tabby-cni and $CNI_NET_DIR/$CNI_CONF_NAME for node $NODE_NAME"
	;;
--watch-token)
	while :; do
		write_kubeconfig
		if [ "$changed" = 1 ]; then say "$CNI_NET_DIR/$KUBECONFIG_NAME rewritten (token or address changed)"; fi
		sleep "$TOKEN_CHECK_S"
	done
	;;
*)
	say "usage: tabby-install-cni [--watch-token]"
	exit 2
	;;
esac
