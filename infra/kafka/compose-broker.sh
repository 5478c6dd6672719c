#!/bin/sh
# The Kafka service of docker-compose.yml (apache/kafka image): the same secured single node as
# `loraledger stack up` runs (infra/kafka/broker.py). Clients authenticate with
# SASL/SCRAM-SHA-512, the controller listener accepts the admin alone (SASL/PLAIN against this
# config), and the StandardAuthorizer denies whatever no ACL allows. The admin's SCRAM credential
# is written when the storage is formatted; the init job creates the other principals and the
# ACLs (`loraledger stack up --external`).
set -eu
: "${KAFKA_ADMIN_PASSWORD:?set KAFKA_ADMIN_PASSWORD in .env (see docker-compose.yml)}"
KAFKA_HOME=${KAFKA_HOME:-/opt/kafka}
DATA=${KAFKA_DATA:-/var/lib/kafka/data}
HOST=${KAFKA_ADVERTISED_HOST:-kafka}
PORT=${KAFKA_PORT:-9092}
CONTROLLER_PORT=$((PORT + 1))
CONFIG=/tmp/server.properties
umask 077  # the config and the admin's client config hold the password

SCRAM_LOGIN="org.apache.kafka.common.security.scram.ScramLoginModule required"
PLAIN_LOGIN="org.apache.kafka.common.security.plain.PlainLoginModule required"
ADMIN="username=\"admin\" password=\"$KAFKA_ADMIN_PASSWORD\""

cat > "$CONFIG" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=CLIENT://0.0.0.0:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=CLIENT://$HOST:$PORT
listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT
inter.broker.listener.name=CLIENT
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.client.scram-sha-512.sasl.jaas.config=$SCRAM_LOGIN $ADMIN;
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=$PLAIN_LOGIN $ADMIN user_admin="$KAFKA_ADMIN_PASSWORD";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.dirs=$DATA
EOF

# For the healthcheck: kafka-topics.sh --command-config /tmp/admin.properties.
cat > /tmp/admin.properties <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=$SCRAM_LOGIN $ADMIN;
EOF

if [ ! -f "$DATA/meta.properties" ]; then
  "$KAFKA_HOME/bin/kafka-storage.sh" format -c "$CONFIG" \
    -t "$("$KAFKA_HOME/bin/kafka-storage.sh" random-uuid)" \
    --add-scram "SCRAM-SHA-512=[name=admin,password=$KAFKA_ADMIN_PASSWORD]"
fi
exec "$KAFKA_HOME/bin/kafka-server-start.sh" "$CONFIG"
