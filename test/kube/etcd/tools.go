//go:build tools

// Package tools pins etcd's main package (go.etcd.io/etcd/server/v3), which
// test/kube/build.sh builds, so that `go mod tidy` keeps every module it
// needs in go.mod and go.sum. Nothing here is compiled into a binary of ours.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
